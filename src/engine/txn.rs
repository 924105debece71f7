//! Transactions (DESIGN §6): BEGIN, writes into a private overlay, COMMIT / ROLLBACK, and
//! LOCK for optimistic concurrency.
//!
//! A transaction's pages go to the WAL as they arrive (records without SELF_COMMIT, tagged
//! with its id), so memory holds only the overlay's extents, never the data. COMMIT appends
//! one commit record — the only switch that makes the transaction visible, before or after a
//! crash — then publishes the overlay into the index under one change count.
//!
//! The image write lock: LOCK validates, under the writer mutex, that the change count has not
//! moved since BEGIN, then makes this transaction the lock holder. While held, plain writes
//! and other transactions' commits wait (on `lock_cv`). A holder past its deadline loses the
//! lock to the next waiter: its transaction is marked expired and its COMMIT fails.

use super::extent::ExtentMap;
use super::log::{BufVal, LogWriter, Placed};
use super::session::Session;
use super::wal::Kind;
use super::{Error, Result};
use std::collections::{BTreeMap, HashSet};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

/// One open transaction, owned by its connection.
#[derive(Debug)]
pub struct Txn {
    pub id: u64,
    /// The image's change count at BEGIN; LOCK fails if it moved.
    pub begin_change: u64,
    /// This transaction's writes, at WAL positions (read-your-writes).
    pub overlay: ExtentMap<BufVal>,
    /// The WAL segment that was newest at BEGIN: its records are there or in later ones, so
    /// no segment from this one on is deleted while the transaction is open.
    pub first_segment: u64,
    /// Page data bytes written so far (bounded by `txn_bytes_max`).
    pub bytes: u64,
    pub holds_lock: bool,
    /// A write pushed it past `txn_bytes_max`: it can only be rolled back now.
    pub too_large: bool,
    /// One of its writes failed: committing the rest would apply a partial write set, so
    /// COMMIT fails.
    pub failed: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct LockHolder {
    pub txn_id: u64,
    pub deadline: Instant,
}

impl Txn {
    /// Takes pages appended for this transaction into its overlay.
    pub(super) fn add(&mut self, placed: Vec<Placed>, page_size_bits: u32) {
        for (first, count, at) in placed {
            let value = BufVal {
                change: 0,
                pos: at.unwrap_or(BufVal::ZERO),
                page_size_bits: page_size_bits as u8,
            };
            self.overlay.insert(first, count, value);
            self.bytes += if at.is_some() {
                count << page_size_bits
            } else {
                0
            };
        }
    }
}

/// Per-session transaction bookkeeping, kept in `LogWriter` (guarded by the log's writer mutex, because LOCK compares change
/// counts and COMMIT appends under it).
#[derive(Debug, Default)]
pub struct TxnTable {
    pub open: usize,
    pub lock: Option<LockHolder>,
    /// Transactions that lost the lock to a timeout; their COMMIT fails.
    pub expired: HashSet<u64>,
    /// `first_segment` of each open transaction → how many: WAL segments they pin.
    pub pinned_segments: BTreeMap<u64, usize>,
}

impl Session {
    /// The writer mutex for a write. Writes inside a transaction are private until COMMIT,
    /// so they do not wait for the image lock; plain writes do.
    pub(super) fn lock_writer(&self, txn: Option<&Txn>) -> Result<MutexGuard<'_, LogWriter>> {
        match txn {
            Some(t) => {
                let w = self.log.writer.lock().unwrap();
                self.check_usable()?;
                if w.txns.expired.contains(&t.id) {
                    return Err(self.expired(t.id));
                }
                Ok(w)
            }
            None => self.wait_for_lock(None),
        }
    }

    pub fn begin(&self) -> Result<Txn> {
        self.check_usable()?;
        let mut w = self.log.writer.lock().unwrap();
        let id = w.next_txn_id;
        w.next_txn_id += 1;
        w.txns.open += 1;
        let first_segment = w.wal.segment();
        *w.txns.pinned_segments.entry(first_segment).or_default() += 1;
        Ok(Txn {
            id,
            begin_change: w.change_count,
            overlay: ExtentMap::new(),
            first_segment,
            bytes: 0,
            holds_lock: false,
            too_large: false,
            failed: false,
        })
    }

    /// LOCK_TXN: fails with `Conflict` if any change committed since BEGIN.
    pub fn lock(&self, txn: &mut Txn) -> Result<()> {
        // Also for a holder: its lock may have expired meanwhile (then this fails).
        let mut w = self.wait_for_lock(Some(txn))?;
        if txn.holds_lock {
            return Ok(()); // a repeated LOCK does not extend the deadline
        }
        if w.change_count != txn.begin_change {
            return Err(Error::Conflict {
                image: self.image_id.clone(),
                why: format!(
                    "{} change(s) committed since BEGIN",
                    w.change_count - txn.begin_change
                ),
            });
        }
        let timeout = Duration::from_millis(self.buffer.cfg.txn_lock_timeout_ms);
        w.txns.lock = Some(LockHolder {
            txn_id: txn.id,
            deadline: Instant::now() + timeout,
        });
        txn.holds_lock = true;
        Ok(())
    }

    /// The writer mutex once no other transaction holds the image lock. A holder past its
    /// deadline loses the lock here: its transaction is marked expired.
    fn wait_for_lock(&self, txn: Option<&Txn>) -> Result<MutexGuard<'_, LogWriter>> {
        let mine = txn.map(|t| t.id);
        let mut w = self.log.writer.lock().unwrap();
        loop {
            self.check_usable()?;
            if let Some(id) = mine.filter(|id| w.txns.expired.contains(id)) {
                return Err(self.expired(id));
            }
            let Some(holder) = w.txns.lock else {
                return Ok(w);
            };
            let now = Instant::now();
            if Some(holder.txn_id) == mine && now < holder.deadline {
                return Ok(w);
            }
            if now >= holder.deadline {
                log::warn!(
                    "image {}: transaction {} held the write lock past its timeout; it is \
                     rolled back and its COMMIT will fail",
                    self.image_id,
                    holder.txn_id
                );
                w.txns.expired.insert(holder.txn_id);
                w.txns.lock = None;
                self.log.lock_cv.notify_all();
                continue;
            }
            w = self
                .log
                .lock_cv
                .wait_timeout(w, holder.deadline - now)
                .unwrap()
                .0;
        }
    }

    fn expired(&self, id: u64) -> Error {
        Error::Conflict {
            image: self.image_id.clone(),
            why: format!(
                "transaction {id} held the write lock past its timeout and was rolled back"
            ),
        }
    }

    /// COMMIT_TXN: one commit record, then the overlay becomes visible as one change.
    pub fn commit(&self, txn: Txn) -> Result<()> {
        if txn.too_large {
            self.end(txn, Kind::Abort);
            let max = self.buffer.cfg.txn_bytes_max;
            return Err(Error::TxnTooLarge {
                image: self.image_id.clone(),
                max,
            });
        }
        if txn.failed {
            let id = txn.id;
            self.end(txn, Kind::Abort);
            return Err(Error::Conflict {
                image: self.image_id.clone(),
                why: format!("a write of transaction {id} failed; it was rolled back"),
            });
        }
        let mut w = match self.wait_for_lock(Some(&txn)) {
            Ok(w) => w,
            Err(e) => {
                self.end(txn, Kind::Abort);
                return Err(e);
            }
        };
        if txn.holds_lock && w.txns.lock.is_none_or(|h| h.txn_id != txn.id) {
            // Our lock was taken by a timeout (and the holder slot reused).
            drop(w);
            let e = self.expired(txn.id);
            self.end(txn, Kind::Abort);
            return Err(e);
        }
        if txn.overlay.is_empty() {
            self.release(&mut w, &txn);
            return Ok(());
        }
        let change = w.change_count + 1;
        if let Err(e) = self.log.append_end(&mut w, Kind::Commit, txn.id, change) {
            self.release(&mut w, &txn);
            return Err(e);
        }
        w.change_count = change;
        let placed = txn
            .overlay
            .iter()
            .map(|e| (e.start, e.len, (!e.value.is_zero()).then_some(e.value.pos)));
        self.log.publish(change, placed);
        self.release(&mut w, &txn);
        Ok(())
    }

    /// ROLLBACK_TXN (also on disconnect): an abort record, and the lock released.
    pub fn rollback(&self, txn: Txn) {
        self.end(txn, Kind::Abort);
    }

    fn end(&self, txn: Txn, kind: Kind) {
        let mut w = self.log.writer.lock().unwrap();
        if !txn.overlay.is_empty() {
            // Best effort: without it, recovery discards the records anyway (no commit).
            if let Err(e) = self.log.append_end(&mut w, kind, txn.id, 0) {
                log::warn!("image {}: {e}", self.image_id);
            }
        }
        self.release(&mut w, &txn);
    }

    fn release(&self, w: &mut LogWriter, txn: &Txn) {
        w.txns.open -= 1;
        if let Some(n) = w.txns.pinned_segments.get_mut(&txn.first_segment) {
            *n -= 1;
            if *n == 0 {
                w.txns.pinned_segments.remove(&txn.first_segment);
            }
        }
        w.txns.expired.remove(&txn.id);
        if w.txns.lock.is_some_and(|h| h.txn_id == txn.id) {
            w.txns.lock = None;
            self.log.lock_cv.notify_all();
        }
    }
}
