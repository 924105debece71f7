//! SIGTERM/SIGINT → graceful shutdown. The handler only does async-signal-safe things: it sets
//! a flag and `shutdown(2)`s the listening socket, which makes the blocked `accept` return.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static LISTEN_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    let fd = LISTEN_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: shutdown(2) is async-signal-safe; fd is our listening socket.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }
}

/// Installs the handlers; `fd` is the listening socket to wake.
pub fn install(fd: i32) {
    LISTEN_FD.store(fd, Ordering::SeqCst);
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installing a handler that only touches atomics and calls shutdown(2).
        // sigaction with SA_RESTART rather than signal(): its semantics are the same on
        // every libc (no one-shot reset), and other threads' blocking calls resume.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "cannot install the handler for signal {sig}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
