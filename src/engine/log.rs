//! The log: an image's WAL segments in the buffer store, the index of the pages they hold
//! that no layer has yet (the buffer), and the group commit that makes appends durable.
//!
//! Appends, the change count and the transaction table change only under `writer`; what
//! reads see (segments and buffered pages) only under `buffered`'s write lock, taken inside
//! `writer`. Only a checkpoint moves the log on to a new segment (`rotate`), and segments go
//! (`retire`) once nothing buffered, no open transaction and no append needs them.

use super::buffer::BufferStore;
use super::extent::{ExtentMap, ExtentValue};
use super::txn::TxnTable;
use super::wal::{self, Kind, PageCrcs, Record, WalFile, WalHeader, FLAG_SELF_COMMIT};
use super::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

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

/// One change to pages, as written to the WAL.
pub enum PageOp<'a> {
    Data { first_page: u64, data: &'a [u8] },
    Zero { first_page: u64, count: u64 },
}

impl PageOp<'_> {
    pub fn payload_len(&self) -> u64 {
        match self {
            PageOp::Data { data, .. } => data.len() as u64,
            PageOp::Zero { .. } => 0,
        }
    }
}

/// Pages `[first, first+count)` appended at WAL position `pos` (None: zeros).
pub type Placed = (u64, u64, Option<u64>);

/// State only the writer touches.
pub struct LogWriter {
    pub wal: WalFile,
    pub next_seq: u64,
    pub next_txn_id: u64,
    /// The newest committed change (recovery and layers skip changes at or below a count).
    pub change_count: u64,
    /// Transaction state shared by all connections (see `txn.rs`).
    pub txns: TxnTable,
}

/// What reads see of the log.
pub struct Buffered {
    /// Every WAL segment still on disk, by number; the newest takes the appends.
    pub segments: BTreeMap<u64, Arc<File>>,
    /// The committed pages no layer holds yet.
    pub index: ExtentMap<BufVal>,
}

pub struct Log {
    image_id: String,
    page_size_bits: u32,
    pub writer: Mutex<LogWriter>,
    pub buffered: RwLock<Buffered>,
    /// Signalled when the image write lock (LOCK_TXN) is released; waited on with `writer`.
    pub lock_cv: Condvar,
    /// Group commit: appends done, and appends known durable.
    write_seq: AtomicU64,
    durable_seq: AtomicU64,
    sync_lock: Mutex<()>,
}

impl Log {
    pub fn new(image_id: &str, page_size_bits: u32, w: LogWriter, b: Buffered) -> Log {
        Log {
            image_id: image_id.to_string(),
            page_size_bits,
            writer: Mutex::new(w),
            buffered: RwLock::new(b),
            lock_cv: Condvar::new(),
            write_seq: AtomicU64::new(0),
            durable_seq: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
        }
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            image: self.image_id.clone(),
            op,
            source,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buffered.read().unwrap().index.is_empty()
    }

    /// Pages buffered (committed, in no layer yet).
    pub fn pages(&self) -> u64 {
        self.buffered.read().unwrap().index.pages()
    }

    /// Appends `ops` as records of transaction `txn_id`: self-committing ones carrying
    /// `change` if `self_commit`, else left for a COMMIT record. Returns where each landed.
    pub fn append_ops(
        &self,
        w: &mut LogWriter,
        ops: &[PageOp],
        txn_id: u64,
        self_commit: Option<u64>,
    ) -> Result<Vec<Placed>> {
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
                flags: if self_commit.is_some() {
                    FLAG_SELF_COMMIT
                } else {
                    0
                },
                seq: w.next_seq,
                txn_id,
                change_count: self_commit.unwrap_or(0),
                first_page,
                page_count: count,
                payload_len: data.len() as u32,
            };
            let pos = self.append(w, &rec, data)?;
            placed.push((first_page, count, (kind == Kind::Data).then_some(pos)));
        }
        Ok(placed)
    }

    /// Appends a record without pages: the COMMIT or ABORT of transaction `txn_id`, or the
    /// SEAL that ends a segment.
    pub fn append_end(
        &self,
        w: &mut LogWriter,
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
        self.append(w, &rec, &[]).map(|_| ())
    }

    fn append(&self, w: &mut LogWriter, rec: &Record, data: &[u8]) -> Result<u64> {
        let pos = w
            .wal
            .append(rec, data)
            .map_err(self.io_err("append to WAL"))?;
        // Only a record that is in the file uses up its seq: replay needs no gaps.
        w.next_seq += 1;
        self.write_seq.fetch_add(1, Ordering::AcqRel);
        Ok(pos)
    }

    /// Makes committed pages visible to reads as change `change` (the caller holds
    /// `writer`). Returns the pages buffered now.
    pub fn publish(&self, change: u64, placed: impl IntoIterator<Item = Placed>) -> u64 {
        let bits = self.page_size_bits as u8;
        let mut b = self.buffered.write().unwrap();
        for (first, count, at) in placed {
            let value = BufVal {
                change,
                pos: at.unwrap_or(BufVal::ZERO),
                page_size_bits: bits,
            };
            b.index.insert(first, count, value);
        }
        b.index.pages()
    }

    /// Makes every append so far durable (group commit: concurrent callers share one
    /// `fdatasync`).
    pub fn flush(&self) -> Result<()> {
        let target = self.write_seq.load(Ordering::Acquire);
        if self.durable_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _g = self.sync_lock.lock().unwrap();
        if self.durable_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        // Read the counter before taking the files: every append it counts is in one of the
        // segments listed now (a segment joins `buffered` before it takes appends), or in one
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
    pub fn segment_files(&self) -> Vec<Arc<File>> {
        let b = self.buffered.read().unwrap();
        b.segments.values().cloned().collect()
    }

    /// Creates the WAL segment that follows the newest one (only a checkpoint moves the log
    /// on, so the number stays right until it `rotate`s).
    pub fn prepare_segment(&self, buffer: &BufferStore) -> Result<WalFile> {
        let header = {
            let w = self.writer.lock().unwrap();
            WalHeader {
                segment: w.wal.segment() + 1,
                ..w.wal.header.clone()
            }
        };
        if header.segment > wal::SEGMENT_NUMBER_MAX {
            return Err(Error::Io {
                image: self.image_id.clone(),
                op: "create WAL segment",
                source: std::io::Error::other("WAL segment numbers exhausted"),
            });
        }
        let path = buffer.wal_segment_path(&self.image_id, header.segment);
        WalFile::create(&path, &header).map_err(self.io_err("create WAL segment"))
    }

    /// Seals the newest segment and makes `next` (from `prepare_segment`) the newest.
    /// Returns the sealed segment's page checksums.
    pub fn rotate(&self, w: &mut LogWriter, next: WalFile) -> Result<PageCrcs> {
        assert_eq!(next.segment(), w.wal.segment() + 1, "one rotator");
        self.append_end(w, Kind::Seal, 0, 0)?;
        // The new segment joins `buffered` before it takes an append (see `flush`).
        let mut b = self.buffered.write().unwrap();
        b.segments.insert(next.segment(), next.file.clone());
        drop(b);
        Ok(std::mem::replace(&mut w.wal, next).page_crcs)
    }

    /// Deletes the WAL segments older than anything still needed: the newest segment, the
    /// oldest one a buffered page points into, and the oldest one an open transaction may
    /// have written to. Their contents are all in the image store.
    pub fn retire(&self, buffer: &BufferStore) -> Result<()> {
        let retired: Vec<u64> = {
            let w = self.writer.lock().unwrap();
            let pinned = w.txns.pinned_segments.keys().next().copied();
            let mut b = self.buffered.write().unwrap();
            let indexed = b.index.iter().filter_map(|e| e.value.segment()).min();
            let keep_from = [Some(w.wal.segment()), pinned, indexed]
                .into_iter()
                .flatten()
                .min()
                .expect("the newest segment is always kept");
            let kept = b.segments.split_off(&keep_from);
            std::mem::replace(&mut b.segments, kept)
                .into_keys()
                .collect()
        };
        if retired.is_empty() {
            return Ok(());
        }
        for seg in &retired {
            let path = buffer.wal_segment_path(&self.image_id, *seg);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io_err("delete WAL segment")(e)),
            }
        }
        crate::store::local::fsync_dir(&buffer.dir).map_err(self.io_err("fsync buffer store"))?;
        log::debug!(
            "image {}: deleted WAL segment(s) {:?}",
            self.image_id,
            retired
        );
        Ok(())
    }

    /// Drops the buffered pages of changes up to `change_count`: a published layer holds
    /// them now.
    pub fn forget_through(&self, change_count: u64) {
        let mut b = self.buffered.write().unwrap();
        b.index.retain(|val| val.change > change_count);
    }

    /// At shutdown: every segment synced, metadata included.
    pub fn sync_all(&self) {
        for file in self.segment_files() {
            if let Err(e) = file.sync_all() {
                log::error!("image {}: fsync WAL at shutdown: {e}", self.image_id);
            }
        }
    }
}
