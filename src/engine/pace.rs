//! Write pacing: plain writes are delayed — never failed — while the session is behind on
//! either kind of write debt: an over-full buffer (checkpoints behind) or layers past the
//! compaction policy's slowdown or stop thresholds (compaction behind; `debt::Policy::pace`,
//! the model of RocksDB's slowdown/stop write triggers).

use super::session::Session;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Longest a single write waits for a checkpoint to drain an over-full buffer. Writes are
/// slowed, never failed, so a store outage cannot turn into client errors here.
pub const THROTTLE_WAIT_MAX_MS: u64 = 1_000;
/// Throttle delay per 10% the buffer is over its threshold.
pub const THROTTLE_DELAY_STEP_MS: u64 = 10;
/// Delay per write per step of compaction-debt slowdown (`debt::Pace::Slow`, 1..=10 steps).
pub const PACE_STEP_US: u64 = 100;
/// How often a write stalled on compaction debt looks again (compaction steps also wake it).
const PACE_RECHECK_MS: u64 = 100;

impl Session {
    /// Paces a write (outside a transaction) by the two kinds of write debt: an over-full
    /// buffer (checkpoints behind) and layers past the compaction policy's slowdown or stop
    /// thresholds (compaction behind). Writes are delayed, never failed.
    pub(super) fn throttle(&self) {
        self.throttle_buffer();
        self.pace_writes();
    }

    /// Slows writers while the buffer is over its threshold and uploads can drain it. The
    /// delay grows with the overshoot (THROTTLE_DELAY_STEP_MS per 10% over, at most
    /// THROTTLE_WAIT_MAX_MS) and ends early when a checkpoint drains the buffer.
    fn throttle_buffer(&self) {
        let cfg = &self.buffer.cfg;
        let limit = cfg.write_throttle_threshold_pages;
        let pages = self.buffered_pages();
        if cfg.disable_image_store_write || pages <= limit {
            return;
        }
        self.wake_checkpoint();
        let tenths_over = ((pages - limit) * 10 / limit.max(1)) + 1;
        let delay = (tenths_over * THROTTLE_DELAY_STEP_MS).min(THROTTLE_WAIT_MAX_MS);
        let deadline = Instant::now() + Duration::from_millis(delay);
        let (m, c) = &self.drained;
        let mut g = m.lock().unwrap();
        while self.buffered_pages() > limit {
            let now = Instant::now();
            if now >= deadline || self.closed.load(Ordering::Acquire) {
                break;
            }
            g = c.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Compaction debt (`debt::Debt::pace`): past the slowdown threshold each write waits
    /// PACE_STEP_US per step, past the stop threshold until compaction brings the debt back
    /// under it (unless compaction is failing: an unreachable store must not hang writers,
    /// who then get the longest slowdown). Each change of pace is logged once, with its cause.
    fn pace_writes(&self) {
        use super::debt::Pace;
        let policy = &self.buffer.cfg.policy;
        let debt = self.version.debt();
        let pace = policy.pace(&debt);
        let level = match pace {
            Pace::Free => 0,
            Pace::Slow(_) => 1,
            Pace::Stop => 2,
        };
        let before = self.pace_level.swap(level, Ordering::AcqRel);
        if level > before {
            let what = if level == 2 { "stalled" } else { "slowed down" };
            log::warn!(
                "image {}: writes {what} until compaction catches up: {}",
                self.image_id,
                debt.cause()
            );
        } else if level == 0 && before > 0 {
            log::info!(
                "image {}: compaction caught up, writes no longer paced: {}",
                self.image_id,
                debt.cause()
            );
        }
        match pace {
            Pace::Free => {}
            Pace::Slow(steps) => {
                std::thread::sleep(Duration::from_micros(PACE_STEP_US * u64::from(steps)))
            }
            Pace::Stop => {
                self.wake_compaction();
                let (m, c) = &self.drained;
                let mut g = m.lock().unwrap();
                while policy.pace(&self.version.debt()) == Pace::Stop && !self.is_stopped() {
                    if self.compactor.is_failing() {
                        drop(g);
                        std::thread::sleep(Duration::from_micros(PACE_STEP_US * 10));
                        return;
                    }
                    g = c
                        .wait_timeout(g, Duration::from_millis(PACE_RECHECK_MS))
                        .unwrap()
                        .0;
                }
            }
        }
    }
}
