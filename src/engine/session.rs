//! A session: one open image, shared by all of its connections. It owns the image's WAL, the
//! in-memory index of buffered pages, the opened layers, and the checkpoint thread.
//!
//! Locks, always taken in this order (a lock may be skipped, never taken out of order):
//! 1. `checkpointing` / `compacting`: one checkpoint, one compaction pass at a time (jobs;
//!    held for the whole job, never both by one thread);
//! 2. `manifest_lock`: one manifest publication at a time (checkpoint or compaction);
//! 3. `writer`: serializes every change to the WAL and the transaction table;
//! 4. `view`: what reads see;
//! 5. leaves, never held while taking another lock but `debt` under `drained`: `drained`,
//!    `debt`, `wake`, `compact_wake`.
//!
//! Reads take only `view`, briefly, to resolve pages to locations; the I/O happens after the
//! lock is released. That is safe because nothing is overwritten in place: WAL segments are
//! append-only (an old one is deleted whole, and an open handle keeps its bytes) and layers are
//! immutable. The slow parts of jobs (writing and uploading layers) hold only level 1.

use super::buffer::BufferStore;
use super::extent::{gaps, ExtentMap, ExtentValue};
use super::layer::{Layer, LayerVal};
use super::manifest::Manifest;
use super::txn::Txn;
use super::wal::{self, Kind, Record, WalFile, FLAG_SELF_COMMIT};
use super::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
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

/// Longest a single write waits for a checkpoint to drain an over-full buffer. Writes are
/// slowed, never failed, so a store outage cannot turn into client errors here.
pub const THROTTLE_WAIT_MAX_MS: u64 = 1_000;
/// Throttle delay per 10% the buffer is over its threshold.
pub const THROTTLE_DELAY_STEP_MS: u64 = 10;
/// Delay per write per step of compaction-debt slowdown (`debt::Pace::Slow`, 1..=10 steps).
pub const PACE_STEP_US: u64 = 100;
/// How often a write stalled on compaction debt looks again (compaction steps also wake it).
const PACE_RECHECK_MS: u64 = 100;

/// Where a buffered page lives: at log position `pos` in the WAL (`wal::position`: segment
/// and byte offset), or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufVal {
    /// The change count of the transaction that wrote it.
    pub change: u64,
    /// WAL log position of the page, or `ZERO`.
    pub pos: u64,
    pub page_size_bits: u8,
}

impl BufVal {
    pub const ZERO: u64 = u64::MAX;
    pub fn is_zero(&self) -> bool {
        self.pos == Self::ZERO
    }
    /// The WAL segment holding the page (None: zeros).
    pub fn segment(&self) -> Option<u64> {
        (!self.is_zero()).then(|| wal::split_position(self.pos).0)
    }
}

impl ExtentValue for BufVal {
    fn advance(&self, pages: u64) -> Self {
        if self.is_zero() {
            *self
        } else {
            BufVal {
                pos: self.pos + (pages << self.page_size_bits),
                ..*self
            }
        }
    }
}

/// State only the writer touches.
pub struct WriterState {
    pub wal: WalFile,
    pub next_seq: u64,
    pub next_txn_id: u64,
    pub change_count: u64,
    /// The newest manifest we wrote or resumed from (None: never written, uploads disabled).
    pub manifest: Option<Manifest>,
    /// Transaction state shared by all connections (see `txn.rs`).
    pub txns: super::txn::TxnTable,
}

/// What reads see.
pub struct View {
    /// Every WAL segment still on disk, by number; the newest takes the appends.
    pub segments: BTreeMap<u64, Arc<File>>,
    pub index: ExtentMap<BufVal>,
    /// Newest first.
    pub layers: Vec<Arc<Layer>>,
}

/// One change to pages, as written to the WAL.
pub enum PageOp<'a> {
    Data { first_page: u64, data: &'a [u8] },
    Zero { first_page: u64, count: u64 },
}

impl PageOp<'_> {
    fn payload_len(&self) -> u64 {
        match self {
            PageOp::Data { data, .. } => data.len() as u64,
            PageOp::Zero { .. } => 0,
        }
    }
}

pub struct Session {
    pub image_id: String,
    pub page_size_bits: u32,
    pub(super) buffer: Arc<BufferStore>,
    pub(super) writer: Mutex<WriterState>,
    pub(super) view: RwLock<View>,
    /// Group commit: appends done, and appends known durable.
    write_seq: AtomicU64,
    durable_seq: AtomicU64,
    sync_lock: Mutex<()>,
    pub(super) fenced: AtomicBool,
    pub(super) closed: AtomicBool,
    connections: AtomicUsize,
    /// Wakes the checkpoint thread early (buffer filling up, last client gone, shutdown).
    pub(super) wake: (Mutex<bool>, Condvar),
    /// Signalled after each checkpoint, for throttled writers.
    pub(super) drained: (Mutex<u64>, Condvar),
    pub(super) checkpoint_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held for a whole checkpoint: one at a time moves the WAL on to its next segment.
    pub(super) checkpointing: Mutex<()>,
    /// Serializes manifest publication (checkpoints and compactions).
    pub(super) manifest_lock: Mutex<()>,
    /// Wakes the compaction thread (after a checkpoint, at shutdown).
    pub(super) compact_wake: (Mutex<bool>, Condvar),
    pub(super) compaction_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The last compaction attempt failed.
    pub(super) compaction_failing: AtomicBool,
    /// Held for a whole compaction pass: one at a time plans and publishes merges.
    pub(super) compacting: Mutex<()>,
    /// The debt of the newest manifest, as the compaction thread last measured it.
    pub(super) debt: Mutex<super::debt::Debt>,
    /// How writes are paced now (a `Pace` level), so that a stall is logged once.
    pace_level: AtomicU8,
    /// Signalled when the image write lock (LOCK_TXN) is released; used with `writer`.
    pub(super) lock_cv: Condvar,
}

/// A resolved piece of a read: `len` pages starting at `start` come from `src`.
enum Src {
    /// A WAL segment file, at a byte offset.
    Wal(Arc<File>, u64),
    Layer(Arc<Layer>, u64),
    Zero,
}

impl Session {
    pub(super) fn new(
        buffer: Arc<BufferStore>,
        image_id: &str,
        page_size_bits: u32,
        writer: WriterState,
        view: View,
    ) -> Session {
        Session {
            image_id: image_id.to_string(),
            page_size_bits,
            buffer,
            writer: Mutex::new(writer),
            view: RwLock::new(view),
            write_seq: AtomicU64::new(0),
            durable_seq: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            fenced: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            wake: (Mutex::new(false), Condvar::new()),
            drained: (Mutex::new(0), Condvar::new()),
            checkpoint_thread: Mutex::new(None),
            lock_cv: Condvar::new(),
            checkpointing: Mutex::new(()),
            manifest_lock: Mutex::new(()),
            compact_wake: (Mutex::new(false), Condvar::new()),
            compaction_thread: Mutex::new(None),
            compaction_failing: AtomicBool::new(false),
            compacting: Mutex::new(()),
            debt: Mutex::new(super::debt::Debt::default()),
            pace_level: AtomicU8::new(0),
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
        self.view.read().unwrap().index.is_empty()
    }

    pub fn buffered_pages(&self) -> u64 {
        self.view.read().unwrap().index.pages()
    }

    pub(super) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_checkpoint();
        self.wake_compaction();
    }

    pub fn wake_compaction(&self) {
        let (m, c) = &self.compact_wake;
        *m.lock().unwrap() = true;
        c.notify_all();
    }

    /// Closed or fenced: background work stops.
    pub fn is_stopped(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.fenced.load(Ordering::Acquire)
    }

    pub fn wake_checkpoint(&self) {
        let (m, c) = &self.wake;
        *m.lock().unwrap() = true;
        c.notify_all();
    }

    // ---------------------------------------------------------------- reads

    /// Reads `buf.len()` bytes at byte `offset` (any alignment), through `txn`'s own writes
    /// if given (read-your-writes). The range is pre-validated.
    pub fn read(&self, txn: Option<&Txn>, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_usable()?;
        if buf.is_empty() {
            return Ok(());
        }
        let ps = self.page_size();
        let first = offset / ps;
        let last = (offset + buf.len() as u64 - 1) / ps;
        let n = last - first + 1;
        let overlay = txn.map(|t| &t.overlay);
        if offset.is_multiple_of(ps) && (buf.len() as u64).is_multiple_of(ps) {
            return self.read_pages(overlay, first, n, buf);
        }
        let mut scratch = vec![0u8; (n * ps) as usize];
        self.read_pages(overlay, first, n, &mut scratch)?;
        let skip = (offset - first * ps) as usize;
        buf.copy_from_slice(&scratch[skip..skip + buf.len()]);
        Ok(())
    }

    /// Reads whole pages `[first, first+n)` into `buf` (exactly `n` pages long).
    pub fn read_pages(
        &self,
        overlay: Option<&ExtentMap<BufVal>>,
        first: u64,
        n: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let pieces = self.resolve(overlay, first, n)?;
        let bits = self.page_size_bits;
        for (start, len, src) in pieces {
            let at = ((start - first) << bits) as usize;
            let out = &mut buf[at..at + (len << bits) as usize];
            match src {
                Src::Zero => out.fill(0),
                Src::Wal(file, off) => file
                    .read_exact_at(out, off)
                    .map_err(self.io_err("read WAL"))?,
                Src::Layer(layer, data_page) => {
                    layer
                        .read_data(data_page, out)
                        .map_err(|source| Error::Store {
                            image: self.image_id.clone(),
                            source,
                        })?
                }
            }
        }
        Ok(())
    }

    /// Maps pages to their newest location: the transaction overlay, the buffer, then layers
    /// newest first, then zeros.
    fn resolve(
        &self,
        overlay: Option<&ExtentMap<BufVal>>,
        first: u64,
        n: u64,
    ) -> Result<Vec<(u64, u64, Src)>> {
        let view = self.view.read().unwrap();
        let mut pieces = Vec::new();
        let mut todo = vec![(first, n)];
        for map in overlay.into_iter().chain(std::iter::once(&view.index)) {
            let mut next = Vec::new();
            for (s, l) in todo {
                let found = map.lookup(s, l);
                for e in &found {
                    let src = if e.value.is_zero() {
                        Src::Zero
                    } else {
                        let (seg, off) = wal::split_position(e.value.pos);
                        let file = view.segments.get(&seg).ok_or_else(|| Error::Io {
                            image: self.image_id.clone(),
                            op: "read WAL",
                            source: std::io::Error::other(format!(
                                "segment {seg} is not open (page {})",
                                e.start
                            )),
                        })?;
                        Src::Wal(file.clone(), off)
                    };
                    pieces.push((e.start, e.len, src));
                }
                next.extend(gaps(s, l, &found));
            }
            todo = next;
        }
        for layer in &view.layers {
            if todo.is_empty() {
                break;
            }
            let mut next = Vec::new();
            for (s, l) in todo {
                let found = layer.lookup(s, l);
                for e in &found {
                    let src = match e.value {
                        LayerVal::Zero => Src::Zero,
                        LayerVal::Data(i) => Src::Layer(layer.clone(), i),
                    };
                    pieces.push((e.start, e.len, src));
                }
                next.extend(gaps(s, l, &found));
            }
            todo = next;
        }
        for (s, l) in todo {
            pieces.push((s, l, Src::Zero));
        }
        Ok(pieces)
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

    /// Appends `ops` to the WAL. Without a transaction they are one committed change (one
    /// self-committing record, or records plus a commit record) published to readers at
    /// once; with one they join the transaction's overlay, invisible to everyone else.
    pub(super) fn append_ops(
        &self,
        w: &mut WriterState,
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
        let mut placed = Vec::with_capacity(ops.len());
        for op in ops {
            let (kind, first_page, count, data): (Kind, u64, u64, &[u8]) = match op {
                PageOp::Data { first_page, data } => (
                    Kind::Data,
                    *first_page,
                    data.len() as u64 >> self.page_size_bits,
                    data,
                ),
                PageOp::Zero { first_page, count } => (Kind::Zero, *first_page, *count, &[]),
            };
            let rec = Record {
                kind,
                flags: if self_commit { FLAG_SELF_COMMIT } else { 0 },
                seq: w.next_seq,
                txn_id,
                change_count: if self_commit { change } else { 0 },
                first_page,
                page_count: count,
                payload_len: data.len() as u32,
            };
            let pos = w
                .wal
                .append(&rec, data)
                .map_err(self.io_err("append to WAL"))?;
            // Only a record that is in the file uses up its seq: replay needs no gaps.
            w.next_seq += 1;
            placed.push((first_page, count, (kind == Kind::Data).then_some(pos)));
        }
        self.write_seq.fetch_add(1, Ordering::AcqRel);
        let bits = self.page_size_bits as u8;
        if let Some(t) = txn {
            for (first, count, at) in placed {
                let pos = at.unwrap_or(BufVal::ZERO);
                t.overlay.insert(
                    first,
                    count,
                    BufVal {
                        change: 0,
                        pos,
                        page_size_bits: bits,
                    },
                );
                t.bytes += if at.is_some() { count << bits } else { 0 };
            }
            return Ok(());
        }
        if !self_commit {
            self.append_commit(w, txn_id, change)?;
        }
        w.change_count = change;
        let mut view = self.view.write().unwrap();
        for (first, count, at) in placed {
            let pos = at.unwrap_or(BufVal::ZERO);
            view.index.insert(
                first,
                count,
                BufVal {
                    change,
                    pos,
                    page_size_bits: bits,
                },
            );
        }
        let pages = view.index.pages();
        drop(view);
        let cfg = &self.buffer.cfg;
        // (With uploads disabled a checkpoint only moves the WAL on to a new segment.)
        let filling =
            !cfg.disable_image_store_write && pages > cfg.write_throttle_threshold_pages / 2;
        if filling || w.wal.end > cfg.wal_segment_checkpoint_bytes {
            self.wake_checkpoint();
        }
        Ok(())
    }

    /// Appends a record without pages: the COMMIT or ABORT of transaction `txn_id`, or the
    /// SEAL that ends a segment.
    pub(super) fn append_end(
        &self,
        w: &mut WriterState,
        kind: Kind,
        txn_id: u64,
        change: u64,
    ) -> Result<()> {
        let rec = Record {
            kind,
            flags: 0,
            seq: w.next_seq,
            txn_id,
            change_count: change,
            first_page: 0,
            page_count: 0,
            payload_len: 0,
        };
        w.wal
            .append(&rec, &[])
            .map_err(self.io_err("append to WAL"))?;
        w.next_seq += 1;
        self.write_seq.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn append_commit(&self, w: &mut WriterState, txn_id: u64, change: u64) -> Result<()> {
        self.append_end(w, Kind::Commit, txn_id, change)
    }

    /// Paces a write (outside a transaction) by the two kinds of write debt: an over-full
    /// buffer (checkpoints behind) and layers past the compaction policy's slowdown or stop
    /// thresholds (compaction behind). Writes are delayed, never failed.
    fn throttle(&self) {
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
        let debt = self.debt();
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
                while policy.pace(&self.debt()) == Pace::Stop && !self.is_stopped() {
                    if self.compaction_failing() {
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

    /// Wakes writers waiting for a checkpoint or a compaction step.
    pub(super) fn notify_drained(&self) {
        let (m, c) = &self.drained;
        *m.lock().unwrap() += 1;
        c.notify_all();
    }

    // ---------------------------------------------------------------- durability

    /// Makes every write replied so far durable (group commit: concurrent callers share one
    /// `fdatasync`).
    pub fn flush(&self) -> Result<()> {
        self.check_usable()?;
        let target = self.write_seq.load(Ordering::Acquire);
        if self.durable_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _g = self.sync_lock.lock().unwrap();
        if self.durable_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        // Read the counter before taking the files: every append it counts is in one of the
        // segments listed now (a segment joins the view before it takes appends), or in one
        // deleted after a checkpoint made its contents durable in the image store.
        let covered = self.write_seq.load(Ordering::Acquire);
        for file in self.segment_files() {
            // A sealed segment already synced has nothing dirty: this returns at once.
            file.sync_data().map_err(self.io_err("fdatasync WAL"))?;
        }
        self.durable_seq.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// The open WAL segment files, oldest first.
    fn segment_files(&self) -> Vec<Arc<File>> {
        self.view
            .read()
            .unwrap()
            .segments
            .values()
            .cloned()
            .collect()
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
            let w = self.writer.lock().unwrap();
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

    /// Server shutdown: stop the checkpoint thread and make the WAL durable.
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_checkpoint();
        self.wake_compaction();
        for t in [&self.checkpoint_thread, &self.compaction_thread] {
            if let Some(h) = t.lock().unwrap().take() {
                let _ = h.join();
            }
        }
        for file in self.segment_files() {
            if let Err(e) = file.sync_all() {
                log::error!("image {}: fsync WAL at shutdown: {e}", self.image_id);
            }
        }
    }
}
