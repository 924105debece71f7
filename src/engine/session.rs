//! A session: one open image, shared by all of its connections. It is made of the image's
//! parts — the log (`log.rs`: WAL, buffered pages, group commit), the version (`version.rs`:
//! newest manifest and its layers) and the transaction table (`txn.rs`, under the log's
//! writer lock) — and the two jobs over them, checkpoint (`checkpoint.rs`) and compaction
//! (`compaction.rs`), each a thread (`jobs.rs`). The lock order is in the `engine` module's
//! documentation. This file keeps the session's lifecycle, the write paths and the stop.

use super::buffer::BufferStore;
use super::jobs::Job;
use super::log::{Log, LogWriter, PageOp};
use super::txn::Txn;
use super::version::Version;
use super::wal::Kind;
use super::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub checkpoint_interval_ms: u64,
    pub checkpoint_interval_jitter_ms: u64,
    pub write_throttle_threshold_pages: u64,
    pub disable_image_store_write: bool,
    /// A checkpoint starts early once the newest WAL segment holds this many bytes, so that
    /// overwrites of a few pages cannot grow the log without bound between checkpoints.
    pub wal_segment_checkpoint_bytes: u64,
    /// Largest transaction (bytes of page data); larger ones fail with ENOSPC.
    pub txn_bytes_max: u64,
    /// How long a LOCK_TXN holder may block other writers.
    pub txn_lock_timeout_ms: u64,
    /// The compaction policy (`debt::Policy::DEFAULT`; tests scale it down).
    pub policy: super::debt::Policy,
}

pub struct Session {
    pub image_id: String,
    pub page_size_bits: u32,
    pub(super) buffer: Arc<BufferStore>,
    pub(super) log: Log,
    pub(super) version: Version,
    pub(super) checkpointer: Job,
    pub(super) compactor: Job,
    /// Counts checkpoints and compaction steps; signalled after each, for paced writers.
    pub(super) drained: (Mutex<u64>, Condvar),
    /// How writes are paced now (a `Pace` level), so that a stall is logged once.
    pub(super) pace_level: AtomicU8,
    pub(super) fenced: AtomicBool,
    pub(super) closed: AtomicBool,
    connections: AtomicUsize,
    /// Scan hint: image readers reading in order (src/engine/scan.rs).
    pub(super) scans: super::scan::Scans,
    /// The image store reads ahead (`ImageStore::reads_ahead`), so scans are worth noting:
    /// asked once, not on every read.
    pub(super) reads_ahead: bool,
    /// Last field, so dropped last: hands the session's memory back to the system.
    _release: crate::memory::ReleaseOnDrop,
}

impl Session {
    pub(super) fn new(
        buffer: Arc<BufferStore>,
        image_id: &str,
        page_size_bits: u32,
        log: Log,
        version: Version,
    ) -> Session {
        let reads_ahead = buffer.store.reads_ahead();
        Session {
            image_id: image_id.to_string(),
            page_size_bits,
            buffer,
            log,
            version,
            checkpointer: Job::new(),
            compactor: Job::new(),
            drained: (Mutex::new(0), Condvar::new()),
            pace_level: AtomicU8::new(0),
            fenced: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            scans: super::scan::Scans::new(page_size_bits),
            reads_ahead,
            _release: crate::memory::ReleaseOnDrop,
        }
    }

    pub fn page_size(&self) -> u64 {
        1 << self.page_size_bits
    }

    pub(super) fn io_err(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            image: self.image_id.clone(),
            op,
            source,
        }
    }

    pub fn check_usable(&self) -> Result<()> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(Error::Fenced {
                image: self.image_id.clone(),
            });
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown {
                image: self.image_id.clone(),
            });
        }
        Ok(())
    }

    pub fn attach(&self) {
        self.connections.fetch_add(1, Ordering::AcqRel);
    }

    pub fn detach(&self) {
        if self.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake_checkpoint();
        }
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    pub fn buffer_is_empty(&self) -> bool {
        self.log.is_empty()
    }

    pub fn buffered_pages(&self) -> u64 {
        self.log.pages()
    }

    pub(super) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_checkpoint();
        self.wake_compaction();
    }

    pub fn wake_compaction(&self) {
        self.compactor.wake();
    }

    /// Closed or fenced: background work stops.
    pub fn is_stopped(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.fenced.load(Ordering::Acquire)
    }

    pub fn wake_checkpoint(&self) {
        self.checkpointer.wake();
    }

    /// Publishes the manifest `edit` makes of `base` (the newest, read under `publishing`)
    /// with the layers it adds, `opened` (`Version::publish`). If another buffer store wrote
    /// that generation or a newer one, this session is fenced from then on.
    pub(super) fn publish(
        &self,
        publishing: &std::sync::MutexGuard<'_, ()>,
        base: &super::manifest::Manifest,
        edit: &crate::catalog::Edit,
        opened: Vec<Arc<super::layer::Layer>>,
    ) -> Result<super::manifest::Manifest> {
        let store = self.buffer.store.as_ref();
        let refusal = match self.version.publish(publishing, store, base, edit, opened) {
            Ok(next) => return Ok(next),
            Err(r) => r,
        };
        if let super::version::Refusal::Fenced { generation } = refusal {
            self.fenced.store(true, Ordering::Release);
            log::error!(
                "image {}: fenced: generation {generation} was written by another buffer \
                 store. This server stops writing the image; its WAL stays in the buffer \
                 store for inspection. Serve the image from the new owner only.",
                self.image_id,
            );
        }
        Err(refusal.into_error(&self.image_id))
    }

    /// Wakes writers waiting for a checkpoint or a compaction step.
    pub(super) fn notify_drained(&self) {
        let (m, c) = &self.drained;
        *m.lock().unwrap() += 1;
        c.notify_all();
    }

    // ---------------------------------------------------------------- writes

    /// Writes `data` at byte `offset` (any alignment): one committed change, or part of `txn`.
    pub fn write(&self, txn: Option<&mut Txn>, offset: u64, data: &[u8]) -> Result<()> {
        match txn {
            Some(t) => {
                let r = self.write_inner(Some(&mut *t), offset, data);
                t.failed |= r.is_err();
                r
            }
            None => self.write_inner(None, offset, data),
        }
    }

    fn write_inner(&self, txn: Option<&mut Txn>, offset: u64, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        if data.is_empty() {
            return Ok(());
        }
        if txn.is_none() {
            self.throttle();
        }
        let mut w = self.lock_writer(txn.as_deref())?;
        let ps = self.page_size();
        if offset.is_multiple_of(ps) && (data.len() as u64).is_multiple_of(ps) {
            let op = PageOp::Data {
                first_page: offset / ps,
                data,
            };
            return self.append_ops(&mut w, txn, &[op]);
        }
        let merged = self.merge_partial(txn.as_deref(), offset, data)?;
        let op = PageOp::Data {
            first_page: offset / ps,
            data: &merged,
        };
        self.append_ops(&mut w, txn, &[op])
    }

    /// Whole pages covering `[offset, offset+data.len())` with `data` laid over current contents.
    fn merge_partial(&self, txn: Option<&Txn>, offset: u64, data: &[u8]) -> Result<Vec<u8>> {
        let ps = self.page_size();
        let first = offset / ps;
        let last = (offset + data.len() as u64 - 1) / ps;
        let mut pages = vec![0u8; ((last - first + 1) * ps) as usize];
        let overlay = txn.map(|t| &t.overlay);
        // Only the edge pages need their old contents; the middle is overwritten.
        self.read_pages(overlay, first, 1, &mut pages[..ps as usize])?;
        if last != first {
            let at = ((last - first) * ps) as usize;
            self.read_pages(overlay, last, 1, &mut pages[at..])?;
        }
        let skip = (offset - first * ps) as usize;
        pages[skip..skip + data.len()].copy_from_slice(data);
        Ok(pages)
    }

    /// Zeros `[offset, offset+len)`: whole pages become zero extents (no data written) unless
    /// `allocate` (NBD_CMD_FLAG_NO_HOLE), partial edge pages are read-modify-written.
    pub fn write_zeroes(
        &self,
        txn: Option<&mut Txn>,
        offset: u64,
        len: u64,
        allocate: bool,
    ) -> Result<()> {
        match txn {
            Some(t) => {
                let r = self.write_zeroes_inner(Some(&mut *t), offset, len, allocate);
                t.failed |= r.is_err();
                r
            }
            None => self.write_zeroes_inner(None, offset, len, allocate),
        }
    }

    fn write_zeroes_inner(
        &self,
        txn: Option<&mut Txn>,
        offset: u64,
        len: u64,
        allocate: bool,
    ) -> Result<()> {
        self.check_usable()?;
        if len == 0 {
            return Ok(());
        }
        if txn.is_none() {
            self.throttle();
        }
        let ps = self.page_size();
        let end = offset + len;
        let inner_first = offset.div_ceil(ps);
        let inner_end = end / ps;
        let mut w = self.lock_writer(txn.as_deref())?;
        let t = txn.as_deref();
        let mut edges = Vec::new();
        if inner_first > inner_end {
            // Entirely inside one page.
            edges.push((
                offset,
                self.merge_partial(t, offset, &vec![0u8; len as usize])?,
            ));
        } else {
            if !offset.is_multiple_of(ps) {
                let head = inner_first * ps - offset;
                edges.push((
                    offset,
                    self.merge_partial(t, offset, &vec![0u8; head as usize])?,
                ));
            }
            if !end.is_multiple_of(ps) {
                let tail_start = inner_end * ps;
                let tail = vec![0u8; (end - tail_start) as usize];
                edges.push((tail_start, self.merge_partial(t, tail_start, &tail)?));
            }
        }
        let mut ops: Vec<PageOp> = edges
            .iter()
            .map(|(o, d)| PageOp::Data {
                first_page: o / ps,
                data: d,
            })
            .collect();
        let zero_chunk;
        if inner_end > inner_first {
            let count = inner_end - inner_first;
            if allocate {
                // Bounded scratch: write real zero pages in chunks of at most 8 MiB.
                let chunk_pages = (8u64 << 20) / ps;
                zero_chunk = vec![0u8; (chunk_pages.min(count) * ps) as usize];
                let mut p = inner_first;
                while p < inner_end {
                    let n = chunk_pages.min(inner_end - p);
                    let data = &zero_chunk[..(n * ps) as usize];
                    ops.push(PageOp::Data {
                        first_page: p,
                        data,
                    });
                    p += n;
                }
            } else {
                ops.push(PageOp::Zero {
                    first_page: inner_first,
                    count,
                });
            }
        }
        self.append_ops(&mut w, txn, &ops)
    }

    /// Appends `ops` to the log. Without a transaction they are one committed change (one
    /// self-committing record, or records plus a commit record) published to readers at
    /// once; with one they join the transaction's overlay, invisible to everyone else.
    pub(super) fn append_ops(
        &self,
        w: &mut LogWriter,
        mut txn: Option<&mut Txn>,
        ops: &[PageOp],
    ) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let change = w.change_count + 1;
        let self_commit = txn.is_none() && ops.len() == 1;
        let txn_id = match &txn {
            Some(t) => t.id,
            None => {
                w.next_txn_id += 1;
                w.next_txn_id - 1
            }
        };
        if let Some(t) = txn.as_deref_mut() {
            let bytes: u64 = ops.iter().map(PageOp::payload_len).sum();
            if t.too_large || t.bytes + bytes > self.buffer.cfg.txn_bytes_max {
                // The whole transaction is doomed, not just this write: COMMIT will fail.
                t.too_large = true;
                return Err(Error::TxnTooLarge {
                    image: self.image_id.clone(),
                    max: self.buffer.cfg.txn_bytes_max,
                });
            }
        }
        let placed = self
            .log
            .append_ops(w, ops, txn_id, self_commit.then_some(change))?;
        if let Some(t) = txn {
            t.add(placed, self.page_size_bits);
            return Ok(());
        }
        if !self_commit {
            self.log.append_end(w, Kind::Commit, txn_id, change)?;
        }
        w.change_count = change;
        let pages = self.log.publish(change, placed);
        let cfg = &self.buffer.cfg;
        // (With uploads disabled a checkpoint only moves the WAL on to a new segment.)
        let filling =
            !cfg.disable_image_store_write && pages > cfg.write_throttle_threshold_pages / 2;
        if filling || w.wal.end > cfg.wal_segment_checkpoint_bytes {
            self.wake_checkpoint();
        }
        Ok(())
    }

    // ---------------------------------------------------------------- durability

    /// Makes every write replied so far durable (group commit).
    pub fn flush(&self) -> Result<()> {
        self.check_usable()?;
        self.log.flush()
    }

    /// Graceful stop: checkpoints until the buffer is empty (every replied write is then in
    /// the image store, and the buffer store may be thrown away) or `deadline` passes, the
    /// store keeps failing, or the image is fenced; logs which.
    pub fn drain(&self, deadline: Instant) {
        let started = Instant::now();
        let mut failures = 0u32;
        let mut last_error = None;
        while !self.buffer_is_empty() && !self.buffer.cfg.disable_image_store_write {
            if Instant::now() >= deadline || self.fenced.load(Ordering::Acquire) {
                break;
            }
            match self.checkpoint() {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    log::warn!("image {}: drain: {e}", self.image_id);
                    last_error = Some(e.to_string());
                    let backoff = Duration::from_millis(200 << failures.min(5));
                    std::thread::sleep(
                        backoff.min(deadline.saturating_duration_since(Instant::now())),
                    );
                }
            }
        }
        let (pages, wal_bytes) = {
            let w = self.log.writer.lock().unwrap();
            (self.buffered_pages(), w.wal.end)
        };
        if pages == 0 {
            log::info!(
                "image {}: drained in {} ms: every write is in the image store",
                self.image_id,
                started.elapsed().as_millis()
            );
        } else {
            let why = if self.fenced.load(Ordering::Acquire) {
                "the image is fenced".to_string()
            } else if self.buffer.cfg.disable_image_store_write {
                "image-store writes are disabled".to_string()
            } else {
                format!(
                    "drain timeout reached{}",
                    last_error
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default()
                )
            };
            log::warn!(
                "image {}: drain cut short after {} ms ({why}): {pages} pages stay in the WAL \
                 (newest segment {wal_bytes} bytes); they are durable in the buffer store and \
                 replayed when it next opens the image",
                self.image_id,
                started.elapsed().as_millis()
            );
        }
    }

    /// Server shutdown: stop the jobs and make the WAL durable.
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_checkpoint();
        self.wake_compaction();
        self.checkpointer.join();
        self.compactor.join();
        self.log.sync_all();
    }
}
