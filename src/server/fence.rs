//! client_id fencing (DESIGN §6): a new connection carrying the `client_id` of an open
//! connection to the same image shuts the old one down — its in-flight requests finished or
//! failed, its transaction rolled back — before the new one is served.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a new connection waits for the connection it replaces to wind down.
pub const REPLACE_WAIT_MS: u64 = 30_000;

/// Shuts a connection's socket down (both directions).
pub type Kill = Arc<dyn Fn() + Send + Sync>;

/// Set when a connection has fully ended (its export dropped).
#[derive(Default)]
pub struct Done {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Done {
    pub fn set(&self) {
        *self.done.lock().unwrap() = true;
        self.cv.notify_all();
    }
    /// Waits until set or `timeout`; true if set.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.done.lock().unwrap();
        while !*g {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
        true
    }
}

struct Slot {
    conn: u64,
    kill: Kill,
    done: Arc<Done>,
}

/// Open connections by (image id, client id).
#[derive(Default)]
pub struct ClientFence {
    slots: Mutex<HashMap<(String, String), Slot>>,
}

impl ClientFence {
    /// Registers connection `conn` under `key`, first shutting down and waiting for whichever
    /// connection held it. Returns the `Done` the new connection must set when it ends.
    pub fn claim(&self, key: (String, String), conn: u64, kill: Kill) -> Result<Arc<Done>, String> {
        let done = Arc::new(Done::default());
        loop {
            let old = {
                let mut slots = self.slots.lock().unwrap();
                match slots.remove(&key) {
                    None => {
                        slots.insert(
                            key,
                            Slot {
                                conn,
                                kill,
                                done: done.clone(),
                            },
                        );
                        return Ok(done);
                    }
                    Some(old) => old,
                }
            };
            log::info!(
                "image {} client {}: new connection replaces conn {}; shutting it down",
                key.0,
                key.1,
                old.conn
            );
            (old.kill)();
            if !old.done.wait(Duration::from_millis(REPLACE_WAIT_MS)) {
                return Err(format!(
                    "the connection with client_id {} did not end in time",
                    key.1
                ));
            }
        }
    }

    /// Forgets `conn` (if it still holds `key`) and marks it done.
    pub fn release(&self, key: &(String, String), conn: u64, done: &Done) {
        let mut slots = self.slots.lock().unwrap();
        if slots.get(key).is_some_and(|s| s.conn == conn) {
            slots.remove(key);
        }
        drop(slots);
        done.set();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn claim_replaces_and_waits() {
        let fence = Arc::new(ClientFence::default());
        let key = ("i.mvps-image".to_string(), "c".to_string());
        let killed = Arc::new(AtomicBool::new(false));
        let k = killed.clone();
        let first = fence.claim(
            key.clone(),
            1,
            Arc::new(move || k.store(true, Ordering::SeqCst)),
        );
        let first = first.unwrap();
        let (f2, key2, first2) = (fence.clone(), key.clone(), first.clone());
        // The old connection ends shortly after being killed.
        let ender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f2.release(&key2, 1, &first2);
        });
        let second = fence.claim(key.clone(), 2, Arc::new(|| {})).unwrap();
        assert!(killed.load(Ordering::SeqCst));
        assert!(
            first.wait(Duration::ZERO),
            "claim returned only after the old one ended"
        );
        ender.join().unwrap();
        fence.release(&key, 2, &second);
        assert!(fence.slots.lock().unwrap().is_empty());
    }
}
