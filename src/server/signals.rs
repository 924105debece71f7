//! SIGTERM/SIGINT → graceful shutdown. The handler only does async-signal-safe things: it sets
//! a flag and `shutdown(2)`s the listening socket, which makes the blocked `accept` return.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static LISTEN_FD: AtomicI32 = AtomicI32::new(-1);

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;
const SHUT_RDWR: i32 = 2;

extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn shutdown(fd: i32, how: i32) -> i32;
}

extern "C" fn on_signal(_sig: i32) {
    STOP.store(true, Ordering::SeqCst);
    let fd = LISTEN_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: shutdown(2) is async-signal-safe; fd is our listening socket.
        unsafe {
            shutdown(fd, SHUT_RDWR);
        }
    }
}

/// Installs the handlers; `fd` is the listening socket to wake.
pub fn install(fd: i32) {
    LISTEN_FD.store(fd, Ordering::SeqCst);
    // SAFETY: installing a handler that only touches atomics and calls shutdown(2).
    unsafe {
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
