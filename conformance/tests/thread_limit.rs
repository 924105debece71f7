//! A thread that cannot be started fails the one connection that needed it, never the server
//! (issue "installed like a system service": under a unit's `TasksMax=` or a crowded host,
//! `std::thread::spawn` fails). The server is put in a cgroup (v1 `pids` controller) that
//! allows it only two more tasks than it has; a client then opens a new image, whose session
//! needs three (the connection's thread, the checkpoint and compaction threads). That client
//! gets an error reply; the server logs why, keeps serving the connection it already had, and
//! serves new images again once the limit is lifted.

use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{pattern, wait_for};
use std::path::{Path, PathBuf};
use std::time::Duration;

const PIDS_ROOT: &str = "/sys/fs/cgroup/pids";

/// A pids cgroup of its own; the process moved into it goes back to the root on drop.
struct PidsCgroup {
    dir: PathBuf,
    pid: u32,
}

impl PidsCgroup {
    fn with(pid: u32) -> PidsCgroup {
        let root = Path::new(PIDS_ROOT);
        assert!(
            root.join("cgroup.procs").exists(),
            "this test needs the cgroup v1 pids controller at {PIDS_ROOT}"
        );
        let dir = root.join(format!("mvps-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        PidsCgroup { dir, pid }
    }

    fn current(&self) -> u64 {
        let s = std::fs::read_to_string(self.dir.join("pids.current")).unwrap();
        s.trim().parse().unwrap()
    }

    fn set_max(&self, max: &str) {
        std::fs::write(self.dir.join("pids.max"), max).unwrap();
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            Path::new(PIDS_ROOT).join("cgroup.procs"),
            self.pid.to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_thread_that_cannot_start_fails_one_connection_not_the_server() {
    let mut s = Server::start();
    let first = token::token(&token::image_id("threads-a"), 16 << 20);
    let mut c = s.open(&first);
    c.write(0, &pattern(1, 4096)).unwrap(); // its worker threads exist now
    let cg = PidsCgroup::with(s.pid());
    // Threads of earlier probes may still be ending: wait for a steady count.
    let mut last = cg.current();
    let tasks = wait_for("a steady task count", Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = cg.current();
        let steady = (now == last).then_some(now);
        last = now;
        steady
    });
    cg.set_max(&(tasks + 2).to_string());

    let second = token::token(&token::image_id("threads-b"), 16 << 20);
    let mut d = s.handshake();
    let refused = d.go(&second);
    assert!(
        refused.is_err(),
        "the session opened without its threads\n{}",
        s.log_tail()
    );
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        s.log()
            .contains("start the checkpoint and compaction threads")
            .then_some(())
    });
    s.assert_running();
    // The first connection is untouched.
    assert_eq!(c.read(0, 4096), Ok(pattern(1, 4096)));
    c.write(8192, &pattern(2, 4096)).unwrap();

    cg.set_max("max");
    let mut d = s.open(&second);
    d.write(0, &pattern(3, 4096)).unwrap();
    assert_eq!(d.read(0, 4096), Ok(pattern(3, 4096)));
    drop(cg);
    let st = s.terminate();
    assert_eq!(st.code(), Some(0), "{st}");
}
