//! A session's background jobs, checkpoint and compaction: each is a thread that sleeps until
//! it is woken or its interval passes, runs one pass, and backs off while passes fail. A pass
//! holds the job's own lock (`one_at_a_time`), so a caller outside the thread (a drain, a
//! test, an idle close) and the thread never run the same job at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Job {
    /// Set by `wake`, cleared when the thread takes it (or a pass forgets it).
    wake: (Mutex<bool>, Condvar),
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Held for a whole pass.
    pass: Mutex<()>,
    /// The last pass failed (the image store is failing).
    failing: AtomicBool,
}

impl Job {
    pub fn new() -> Job {
        Job {
            wake: (Mutex::new(false), Condvar::new()),
            thread: Mutex::new(None),
            pass: Mutex::new(()),
            failing: AtomicBool::new(false),
        }
    }

    /// Starts the job's thread, named `name`; a panic in it stops the process (`what` says
    /// whose thread it was).
    pub fn start(
        &self,
        name: String,
        what: String,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(move || super::exit_on_panic(&what, body))?;
        *self.thread.lock().unwrap() = Some(h);
        Ok(())
    }

    /// Asks for a pass now.
    pub fn wake(&self) {
        let (m, c) = &self.wake;
        *m.lock().unwrap() = true;
        c.notify_all();
    }

    /// Forgets the wake-ups so far: the pass that is starting serves them.
    pub fn forget_wakes(&self) {
        *self.wake.0.lock().unwrap() = false;
    }

    /// Sleeps until woken or `timeout` passes (at once if a wake-up is pending), and takes
    /// the wake-up.
    pub fn sleep(&self, timeout: Duration) {
        let (m, c) = &self.wake;
        let mut woken = m.lock().unwrap();
        if !*woken {
            woken = c.wait_timeout(woken, timeout).unwrap().0;
        }
        *woken = false;
    }

    /// Held for a whole pass.
    pub fn one_at_a_time(&self) -> MutexGuard<'_, ()> {
        self.pass.lock().unwrap()
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Release);
    }

    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// Waits for the thread to end (the caller has told it to stop and woken it).
    pub fn join(&self) {
        if let Some(h) = self.thread.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

impl Default for Job {
    fn default() -> Job {
        Job::new()
    }
}
