//! Fail-stop: a panic anywhere in the server stops the whole process.
//!
//! A panic is a bug. Letting one thread die while the others go on is what a storage server
//! must not do: a connection thread that panics while holding a session lock poisons it for
//! every other connection, one that panics inside a request scope leaves its sibling workers
//! blocked on the socket and the shutdown drain waiting for it, and a background thread that
//! dies leaves the image served but never checkpointed again. Every replied write is in the
//! WAL (DESIGN §5), so stopping loses nothing: a restart (systemd `Restart=`) recovers.

/// Makes every panic of this process abort it after logging which thread panicked. The server
/// binary installs it first thing; library users (and unit tests) keep unwinding panics.
pub fn install_panic_hook() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info); // message and location on stderr, as usual
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed thread");
        log::error!("{name}: panicked (a bug); stopping the server so a restart recovers");
        log::logger().flush();
        std::process::abort();
    }));
}

/// Runs the body of a long-lived background thread (checkpoints, compaction, layer writes):
/// a panic there aborts the process even where [`install_panic_hook`] was not installed.
pub(crate) fn exit_on_panic(thread: &str, body: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
        log::error!("{thread}: panicked (a bug); stopping the server so a restart recovers");
        log::logger().flush();
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    /// Re-runs this test binary on `test` (which acts only when `MVPS_TEST_PANIC_CHILD` is
    /// set) and returns its exit status and output.
    fn run_child(test: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env("MVPS_TEST_PANIC_CHILD", "1")
            .output()
            .unwrap()
    }

    /// The child died by SIGABRT, with `expected` (a thread name or the panic message) on
    /// stderr, and did not go on after the panic.
    fn assert_aborted(out: &std::process::Output, expected: &str) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "child: {:?}\n{stderr}",
            out.status
        );
        assert!(
            stderr.contains(expected),
            "stderr should contain {expected:?}: {stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("survived"),
            "the child went on after the panic"
        );
    }

    fn in_child() -> bool {
        std::env::var_os("MVPS_TEST_PANIC_CHILD").is_some()
    }

    /// With the hook, a panic in any thread (here a connection-like thread whose panic would
    /// otherwise only end that thread) stops the process.
    #[test]
    fn a_panic_in_any_thread_stops_the_process() {
        assert_aborted(&run_child("fail_stop::tests::hook_child"), "conn-7");
    }

    #[test]
    fn hook_child() {
        if !in_child() {
            return;
        }
        super::install_panic_hook();
        let t = std::thread::Builder::new()
            .name("conn-7".into())
            .spawn(|| panic!("deliberate"))
            .unwrap();
        let _ = t.join();
        println!("survived");
    }

    /// Without the hook, a panic inside `exit_on_panic` still stops the process (abort),
    /// rather than leaving the image served and never checkpointed again.
    #[test]
    fn a_background_thread_panic_stops_the_process() {
        // No logger in tests: the default hook's message is what reaches stderr.
        assert_aborted(
            &run_child("fail_stop::tests::exit_on_panic_child"),
            "deliberate",
        );
    }

    #[test]
    fn exit_on_panic_child() {
        if !in_child() {
            return;
        }
        super::exit_on_panic("test thread", || panic!("deliberate"));
        println!("survived");
    }
}
