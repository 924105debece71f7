//! A bounded in-memory block cache for immutable blobs read from a remote image store.
//!
//! Layer blobs never change once written, so cached bytes never go stale and nothing is ever
//! invalidated. A blob opened through [`BlockCache::wrap`] is read in blocks of
//! `block_bytes` (4 KiB by default in mvps-te: what a random reader fetches), keyed by
//! (blob key, block index):
//!
//! - **hits** are copied out of memory;
//! - **misses** are fetched block-aligned from the underlying [`BlobReader`], and adjacent
//!   missing blocks of one read are **coalesced** into one ranged read (one GET on S3) of at
//!   most [`FETCH_BYTES_MAX`]; longer runs are split and fetched in parallel. A random reader
//!   thus fetches about what it reads; a sequential one gets large fetches from readahead;
//! - **single flight**: a block being fetched is marked in the map; a second reader that
//!   wants it waits for that fetch instead of starting its own;
//! - **bounded** (CLOCK, an LRU approximation): ready blocks sit on a ring; a read sets a
//!   block's reference bit (under the read lock only, so warm hits never contend for an
//!   exclusive lock); when the buffers held exceed `capacity_bytes` the hand passes over the
//!   ring, clearing set bits and evicting the first block whose bit was clear. Blocks cut
//!   from one GET share its buffers ([`SEGMENT_BYTES`] each, recycled once free), each
//!   counted whole while any of its blocks is cached; once
//!   fewer than half remain, the hot ones are copied out and the rest evicted, so that the
//!   buffer can go. Blocks being fetched, and blocks a reader is still copying out of, are
//!   not counted (they are transient, bounded by the reads in flight);
//! - **readahead that cannot thrash**: reads that continue a sequential stream (up to
//!   [`STREAMS_MAX`] per blob) keep a window of blocks fetched ahead of it in the background.
//!   Each stream's window starts at [`READAHEAD_INITIAL_BYTES`] (or [`READAHEAD_INITIAL_READS`]
//!   of its reads) and grows by [`READAHEAD_GROWTH`] blocks per prefetched block the stream
//!   reads (tripling per window consumed), up to [`READAHEAD_BYTES`]; a prefetched block
//!   evicted unread halves it. All streams of all
//!   blobs share one budget of prefetched-but-unread blocks, a quarter of the cache
//!   ([`READAHEAD_BUDGET_DIVISOR`]), and prefetched blocks get a second chance from the
//!   CLOCK hand, so readahead cannot evict what it fetched before it is read however many
//!   layers are read at once;
//! - **refetches are counted**: a block fetched again after a prefetch of it was evicted
//!   unread (the range was fetched twice while wanted) counts in
//!   [`CacheStats::refetched_blocks`].
//!
//! Reads that would need more blocks than half the cache bypass it (a full scan of a large
//! layer must not evict everything), as does every read when `capacity_bytes` is 0.

use super::disk_cache::{DiskCache, DiskStats};
use super::stream::Streams;
pub use super::stream::{
    SEQUENTIAL_BEHIND_BYTES, SEQUENTIAL_GAP_BYTES_MAX, SEQUENTIAL_GAP_BYTES_MIN,
    SEQUENTIAL_GAP_READS, STREAMS_MAX,
};
use super::{BlobReader, Error, Result};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, RwLock};

/// Longest single ranged read the cache issues (but for readahead's last GET of a blob, which
/// takes along a tail of up to an eighth of this: see `aligned_end`). A longer run of missing
/// blocks is split into reads of this size, fetched in parallel (a single stream rarely fills
/// a link to S3). Readahead of a grown window fetches whole, aligned reads of this size.
pub const FETCH_BYTES_MAX: u64 = 8 << 20;

/// Most parallel reads one cache read issues for a long run of missing blocks.
pub const FETCH_PARALLEL_MAX: usize = 8;

/// Largest readahead window of one stream (and at most the global budget).
pub const READAHEAD_BYTES: u64 = 32 << 20;

/// A new stream's readahead window: small, so that a false start costs little...
pub const READAHEAD_INITIAL_BYTES: u64 = 128 << 10;

/// ...but at least this many of the stream's reads: a reader of 256 KiB (nbdcopy, a guest's
/// readahead) gets 2 MiB, about what 8 NBD worker threads have in flight. Each layer of an
/// image read in order is a new stream (begun by the layer's header and index reads), so how
/// far its window reaches at once decides how much of a layer its readers fetch for
/// themselves, in GETs the size of their reads.
pub const READAHEAD_INITIAL_READS: u64 = 8;

/// Blocks a window grows by per prefetched block its stream reads: it triples per window
/// consumed (a 1 MiB window reaches 32 MiB after about 16 MiB read).
pub const READAHEAD_GROWTH: u64 = 2;

/// Prefetched blocks not yet read (in flight or cached), over all streams of all blobs, are
/// at most the cache's capacity divided by this: readahead can never crowd out the blocks it
/// fetched, nor everything else.
pub const READAHEAD_BUDGET_DIVISOR: u64 = 4;

/// Threads per cache that run readahead fetches (each one ranged GET at a time).
pub const READAHEAD_THREADS: usize = 4;

/// Reads that moved a stream forward before readahead starts for it.
pub const SEQUENTIAL_READS_MIN: u32 = 3;

/// A block read this often is hot: kept (copied out) when the rest of its fetch buffer goes.
/// A sequential scan reads each block once or twice (reads straddle block boundaries).
pub const HOT_READS: u32 = 3;

/// Smallest block size accepted: smaller blocks cost more requests than they save bytes.
pub const BLOCK_BYTES_MIN: u64 = 4 << 10;

/// Largest block size accepted (one block is one allocation).
pub const BLOCK_BYTES_MAX: u64 = 64 << 20;

/// Bytes fetched when a blob is opened (at least one block): a layer's header and, for
/// layers up to ~50 000 pages, its whole index, so that opening a layer is one request.
pub const OPEN_FETCH_BYTES: u64 = 256 << 10;

/// Fetched blocks waiting to be written to the disk tier, in bytes of their fetch buffers:
/// past it, fetched blocks are not written (memory the queue may hold beyond the cache's).
pub const DISK_QUEUE_BYTES_MAX: u64 = 32 << 20;

/// Prefetched blocks read from GETs up to this size go to the disk tier; from larger ones
/// (a sequential stream at full window) they do not.
pub const DISK_ADMIT_PREFETCH_BYTES_MAX: u64 = 1 << 20;

/// Prefetched blocks evicted unread that are remembered (to count refetches), at most.
pub const GHOSTS_MAX: usize = 1 << 16;

/// Counters, for tests, logs and the benchmark. All counts are cumulative unless noted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Blocks served from memory.
    pub hit_blocks: u64,
    /// Blocks fetched from the underlying reader.
    pub miss_blocks: u64,
    /// Blocks another reader was already fetching: waited for, not fetched again.
    pub joined_blocks: u64,
    /// Reads issued to the underlying reader (ranged GETs).
    pub fetches: u64,
    /// Bytes fetched from the underlying reader.
    pub fetched_bytes: u64,
    /// Bytes asked for by readers of cached blobs (bypassing reads included).
    pub read_bytes: u64,
    /// Blocks dropped to stay within the byte bound.
    pub evicted_blocks: u64,
    /// Reads that bypassed the cache (too large, or the cache is disabled).
    pub bypass_reads: u64,
    /// Blocks fetched ahead of sequential readers.
    pub readahead_blocks: u64,
    /// Of those, blocks fetched for scans that cross blobs ([`CachedBlob::prefetch`]).
    pub scan_blocks: u64,
    /// Prefetched blocks that a reader then read.
    pub readahead_used_blocks: u64,
    /// Prefetched blocks evicted before anyone read them (each halves its stream's window).
    pub readahead_wasted_blocks: u64,
    /// Blocks fetched again after a prefetch of them was evicted unread, or fetched twice
    /// at once: bytes that crossed the network twice while wanted. Should stay near 0.
    pub refetched_blocks: u64,
    /// Hot blocks copied out of a mostly evicted fetch buffer.
    pub copied_blocks: u64,
    /// Bytes of ready blocks held now.
    pub held_bytes: u64,
    /// Prefetched blocks not read yet, now (in flight or cached).
    pub readahead_unread_blocks: u64,
    /// The disk tier's counters (all 0 without one).
    pub disk: DiskStats,
    /// Fetched blocks not written to the disk tier because its queue was full.
    pub disk_skipped_blocks: u64,
}

impl std::fmt::Display for CacheStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "read {} B, fetched {} B in {} GETs, hits {} / misses {} / joined {} blocks, \
             readahead {} (scans {}) used {} wasted {} blocks, refetched {} blocks, evicted {}, \
             held {} B",
            self.read_bytes,
            self.fetched_bytes,
            self.fetches,
            self.hit_blocks,
            self.miss_blocks,
            self.joined_blocks,
            self.readahead_blocks,
            self.scan_blocks,
            self.readahead_used_blocks,
            self.readahead_wasted_blocks,
            self.refetched_blocks,
            self.evicted_blocks,
            self.held_bytes
        )?;
        let d = &self.disk;
        if d.written_blocks > 0 {
            write!(
                f,
                "; disk: hits {} written {} skipped {} evicted {} corrupt {} blocks, {} I/O errors",
                d.hit_blocks,
                d.written_blocks,
                self.disk_skipped_blocks,
                d.evicted_blocks,
                d.corrupt_blocks,
                d.io_errors
            )?;
        }
        Ok(())
    }
}

/// A block: the blob's number (interned from its key) and the block's index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct BlockKey {
    blob: u64,
    index: u64,
}

/// Hashes [`BlockKey`]s, several times per block read or fetched: multiply and rotate, far
/// cheaper than the default SipHash (4 % of a cold scan's CPU). SipHash resists keys chosen
/// to collide; these are not chosen freely (blob numbers are handed out in order, and block
/// indices are bounded by the blob's size), and within one blob the hash keeps distinct
/// indices apart in the table's low bits.
#[derive(Default, Clone, Copy)]
struct BlockHasher(u64);

/// An odd constant with well-mixed bits (2^64 / the golden ratio).
const BLOCK_HASH_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

impl std::hash::Hasher for BlockHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(BLOCK_HASH_MULTIPLIER);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type BlockHash = std::hash::BuildHasherDefault<BlockHasher>;

/// The readahead of one sequential stream, shared with the blocks it prefetched: their fate
/// (read, or evicted unread) sizes the window.
struct Window {
    /// Blocks this stream keeps fetched ahead of its frontier.
    blocks: AtomicU64,
    /// Its prefetched blocks not read yet (in flight or cached).
    unread: AtomicU64,
    /// Readahead was issued (or found present) for every block below this index.
    ahead_until: AtomicU64,
    /// Its prefetched blocks evicted unread, ever (a scan's window halves when this moves).
    wasted: AtomicU64,
}

impl Window {
    fn new(blocks: u64, ahead_until: u64) -> Arc<Window> {
        Arc::new(Window {
            blocks: AtomicU64::new(blocks),
            unread: AtomicU64::new(0),
            ahead_until: AtomicU64::new(ahead_until),
            wasted: AtomicU64::new(0),
        })
    }
}

/// The readahead of a scan that crosses blobs (an image read in order: its pages come from
/// many layers, see `engine::scan`). Its prefetches ([`CachedBlob::prefetch`]) share the
/// cache's readahead budget with the blobs' own streams, and are accounted like theirs: a
/// prefetched block read, or evicted unread.
pub struct ScanWindow {
    window: Arc<Window>,
}

impl Default for ScanWindow {
    fn default() -> ScanWindow {
        ScanWindow {
            window: Window::new(0, 0),
        }
    }
}

impl ScanWindow {
    /// Blocks this scan prefetched that were evicted unread, so far.
    pub fn wasted_blocks(&self) -> u64 {
        self.window.wasted.load(Ordering::Relaxed)
    }

    /// Blocks this scan prefetched that nobody has read yet (in flight or cached).
    pub fn unread_blocks(&self) -> u64 {
        self.window.unread.load(Ordering::Relaxed)
    }
}

/// A fetch in progress, shared by every reader waiting for its block.
struct Flight {
    outcome: Mutex<Outcome>,
    done: Condvar,
    /// Started by readahead for this stream, not by a reader: should it fail, waiters fetch
    /// for themselves.
    prefetch: Option<Arc<Window>>,
    /// A reader waits for this prefetch: the block is read as soon as it arrives.
    joined: AtomicBool,
    /// The reader's read ends inside this block: its next read likely starts there.
    read_again: AtomicBool,
}

impl Flight {
    fn new(prefetch: Option<Arc<Window>>) -> Arc<Flight> {
        Arc::new(Flight {
            outcome: Mutex::new(Outcome::default()),
            done: Condvar::new(),
            prefetch,
            joined: AtomicBool::new(false),
            read_again: AtomicBool::new(false),
        })
    }

    fn finish(&self, r: std::result::Result<Block, Error>) {
        let mut g = self.outcome.lock().unwrap();
        g.result = Some(r);
        // A wake-up is a system call: most blocks of a scan have nobody waiting for them.
        if g.waiters > 0 {
            self.done.notify_all();
        }
    }

    fn wait(&self) -> Result<Block> {
        let mut g = self.outcome.lock().unwrap();
        loop {
            if let Some(r) = g.result.as_ref() {
                return match r {
                    Ok(b) => Ok(b.clone()),
                    Err(e) => Err(clone_error(e)),
                };
            }
            g.waiters += 1;
            g = self.done.wait(g).unwrap();
            g.waiters -= 1;
        }
    }
}

/// A flight's result once there is one, and the readers asleep waiting for it.
#[derive(Default)]
struct Outcome {
    result: Option<std::result::Result<Block, Error>>,
    waiters: u32,
}

enum Slot {
    Ready(Ready),
    Loading(Arc<Flight>),
}

/// A cached block. The atomics are updated under the read lock.
struct Ready {
    data: Block,
    /// Read since the clock hand last passed.
    referenced: AtomicBool,
    /// Times read.
    reads: AtomicU32,
    /// Prefetched by this stream and not read yet (`unread` set).
    prefetch: Option<Arc<Window>>,
    unread: AtomicBool,
    /// Tells this insertion's ring entry from stale ones of an earlier insertion.
    seq: u64,
}

#[derive(Default)]
struct State {
    map: HashMap<BlockKey, Slot, BlockHash>,
    /// The CLOCK: ready blocks in the order the hand visits them (front first), with the
    /// `seq` of their insertion; entries of blocks since evicted are skipped when reached.
    ring: VecDeque<(BlockKey, u64)>,
    next_seq: u64,
    held_bytes: u64,
    /// Prefetched blocks evicted unread (to count refetches), oldest first.
    ghosts: HashSet<BlockKey, BlockHash>,
    ghost_order: VecDeque<BlockKey>,
}

#[derive(Default)]
struct Counters {
    hit_blocks: AtomicU64,
    miss_blocks: AtomicU64,
    joined_blocks: AtomicU64,
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
    read_bytes: AtomicU64,
    evicted_blocks: AtomicU64,
    bypass_reads: AtomicU64,
    readahead_blocks: AtomicU64,
    scan_blocks: AtomicU64,
    readahead_used_blocks: AtomicU64,
    readahead_wasted_blocks: AtomicU64,
    refetched_blocks: AtomicU64,
    copied_blocks: AtomicU64,
    /// A gauge: prefetched blocks not read yet.
    readahead_unread_blocks: AtomicU64,
}

/// A blob's number in block keys, and its size once opened.
type BlobId = (u64, Option<u64>);

/// The cache. Share it (`Arc`) between every blob of a store: the byte bound is global.
pub struct BlockCache {
    capacity_bytes: u64,
    block_bytes: u64,
    /// Largest and first window of a stream, in blocks (largest 0: no readahead).
    readahead_max_blocks: u64,
    readahead_initial_blocks: u64,
    /// Most prefetched blocks not yet read, over all streams.
    readahead_budget_blocks: u64,
    /// A fetch's buffers: [`SEGMENT_BYTES`] in whole blocks.
    segment_bytes: u64,
    /// Blocks in the longest fetch, [`FETCH_BYTES_MAX`] (at least one).
    fetch_blocks: u64,
    /// Hits take the read lock; misses, fills and evictions the write lock.
    state: RwLock<State>,
    /// Blob keys → the numbers block keys use, and the blob's size once opened.
    ids: Mutex<HashMap<Arc<str>, BlobId>>,
    counters: Counters,
    /// Runs the readahead fetches.
    pool: Mutex<threadpool::ThreadPool>,
    /// The disk tier below, if any ([`BlockCache::with_disk`]).
    disk: Option<DiskTier>,
}

/// The disk tier and the queue of fetched blocks its writer thread writes to it.
struct DiskTier {
    cache: Arc<DiskCache>,
    /// Fetched blocks to write. The thread ends when this goes.
    queue: mpsc::Sender<DiskJob>,
    /// Bytes of fetch buffers queued (each counted whole), at most [`DISK_QUEUE_BYTES_MAX`].
    queued_bytes: Arc<AtomicU64>,
    /// Blocks not written because the queue was full.
    skipped_blocks: AtomicU64,
}

impl BlockCache {
    /// A cache holding at most `capacity_bytes` of blocks of `block_bytes` each. The block
    /// size must lie in [`BLOCK_BYTES_MIN`]..=[`BLOCK_BYTES_MAX`]; a capacity of 0 disables
    /// caching (every read goes to the underlying reader).
    pub fn new(capacity_bytes: u64, block_bytes: u64) -> std::result::Result<BlockCache, String> {
        if !(BLOCK_BYTES_MIN..=BLOCK_BYTES_MAX).contains(&block_bytes) {
            return Err(format!(
                "image cache block size {block_bytes} bytes: must be between {BLOCK_BYTES_MIN} \
                 and {BLOCK_BYTES_MAX}"
            ));
        }
        if capacity_bytes != 0 && capacity_bytes < block_bytes {
            return Err(format!(
                "image cache size {capacity_bytes} bytes is smaller than one block \
                 ({block_bytes} bytes); use 0 to disable the cache"
            ));
        }
        let budget = capacity_bytes / READAHEAD_BUDGET_DIVISOR / block_bytes;
        // Half the budget at most, so that one stream alone never waits for it; less than
        // two blocks of readahead is not worth it.
        let max = (READAHEAD_BYTES / block_bytes).min(budget / 2);
        let max = if max >= 2 { max } else { 0 };
        // At least two blocks: a window of one is never "less than half fetched ahead".
        let initial = (READAHEAD_INITIAL_BYTES / block_bytes).clamp(2, max.max(2));
        Ok(BlockCache {
            capacity_bytes,
            block_bytes,
            readahead_max_blocks: max,
            readahead_initial_blocks: initial,
            readahead_budget_blocks: budget,
            segment_bytes: SEGMENT_BYTES.div_ceil(block_bytes) * block_bytes,
            fetch_blocks: (FETCH_BYTES_MAX / block_bytes).max(1),
            state: RwLock::new(State::default()),
            ids: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            pool: Mutex::new(
                threadpool::Builder::new()
                    .num_threads(READAHEAD_THREADS)
                    .thread_name("readahead".into())
                    .build(),
            ),
            disk: None,
        })
    }

    /// Puts `disk` below the memory cache: fetched blocks are written to it (by a thread of
    /// its own, off the read path), and a memory miss looks there before fetching. Blocks
    /// must be the same size in both.
    pub fn with_disk(mut self, disk: DiskCache) -> std::result::Result<BlockCache, String> {
        if disk.block_bytes() != self.block_bytes {
            return Err(format!(
                "image cache directory {}: blocks of {} bytes, the memory cache's are {}",
                disk.dir().display(),
                disk.block_bytes(),
                self.block_bytes
            ));
        }
        let cache = Arc::new(disk);
        let (queue, jobs) = mpsc::channel::<DiskJob>();
        let queued_bytes = Arc::new(AtomicU64::new(0));
        let (writer, queued) = (cache.clone(), queued_bytes.clone());
        std::thread::Builder::new()
            .name("image-cache-disk".into())
            .spawn(move || write_to_disk(&writer, &jobs, &queued))
            .map_err(|e| format!("image cache: cannot start the disk writer thread: {e}"))?;
        self.disk = Some(DiskTier {
            cache,
            queue,
            queued_bytes,
            skipped_blocks: AtomicU64::new(0),
        });
        Ok(self)
    }

    /// Queues blocks `first..` of `blob` (cut from one buffer, back to back) for the disk
    /// tier, counting `cost` bytes against the queue's bound; drops them if the queue is full
    /// (the disk is slower than the network just now).
    fn offer_to_disk(&self, blob: u64, first: u64, blocks: &[Block], cost: u64) {
        let Some(d) = &self.disk else {
            return;
        };
        let queued = d.queued_bytes.fetch_add(cost, Ordering::Relaxed);
        let job = DiskJob {
            blob,
            first,
            blocks: blocks.to_vec(),
            cost,
        };
        if queued + cost > DISK_QUEUE_BYTES_MAX || d.queue.send(job).is_err() {
            d.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
            d.skipped_blocks
                .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        }
    }

    /// A prefetched block was read: it is part of what readers read, so it goes to the disk
    /// tier now (prefetched blocks nobody reads never do) — unless it came in a GET larger
    /// than [`DISK_ADMIT_PREFETCH_BYTES_MAX`]: a sequential scan at full speed is cheap to
    /// fetch again, and writing it all out costs the scan CPU and would push the blocks of
    /// random readers (a round trip per block) off the disk.
    fn admit_to_disk(&self, b: &Block) {
        if self.disk.is_some() && b.run.fetch_bytes as u64 <= DISK_ADMIT_PREFETCH_BYTES_MAX {
            let index = b.run.first + (b.start as u64) / self.block_bytes;
            self.offer_to_disk(b.run.blob, index, std::slice::from_ref(b), b.len as u64);
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// Bytes to fetch when a blob is opened: [`OPEN_FETCH_BYTES`] in whole blocks, at least
    /// one block.
    pub fn open_bytes(&self) -> u64 {
        OPEN_FETCH_BYTES.div_ceil(self.block_bytes).max(1) * self.block_bytes
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hit_blocks: get(&c.hit_blocks),
            miss_blocks: get(&c.miss_blocks),
            joined_blocks: get(&c.joined_blocks),
            fetches: get(&c.fetches),
            fetched_bytes: get(&c.fetched_bytes),
            read_bytes: get(&c.read_bytes),
            evicted_blocks: get(&c.evicted_blocks),
            bypass_reads: get(&c.bypass_reads),
            readahead_blocks: get(&c.readahead_blocks),
            scan_blocks: get(&c.scan_blocks),
            readahead_used_blocks: get(&c.readahead_used_blocks),
            readahead_wasted_blocks: get(&c.readahead_wasted_blocks),
            refetched_blocks: get(&c.refetched_blocks),
            copied_blocks: get(&c.copied_blocks),
            held_bytes: self.state.read().unwrap().held_bytes,
            readahead_unread_blocks: get(&c.readahead_unread_blocks),
            disk: self
                .disk
                .as_ref()
                .map(|d| d.cache.stats())
                .unwrap_or_default(),
            disk_skipped_blocks: self.disk.as_ref().map_or(0, |d| get(&d.skipped_blocks)),
        }
    }

    /// `reader` (the blob stored under `key`) read through this cache.
    pub fn wrap(self: &Arc<Self>, key: &str, reader: Box<dyn BlobReader>) -> CachedBlob {
        self.wrap_source(key, Box::new(ReaderSource(reader)))
    }

    /// [`BlockCache::wrap`] for a [`Source`].
    pub fn wrap_source(self: &Arc<Self>, key: &str, source: Box<dyn Source>) -> CachedBlob {
        let id = self.id(key);
        if let Some(e) = self.ids.lock().unwrap().get_mut(key) {
            e.1 = Some(source.size_bytes());
        }
        CachedBlob {
            shared: Arc::new(Blob {
                cache: self.clone(),
                id,
                key: Arc::from(key),
                inner: source,
                seq: Mutex::new(Streams::default()),
            }),
        }
    }

    /// Puts blocks that were fetched some other way (e.g. with the request that learned the
    /// blob's size): `data` holds blocks `index..` (the last one short only at the blob's
    /// end). Blocks already present or being fetched are left alone.
    pub fn insert(&self, key: &str, index: u64, data: Vec<u8>) {
        if self.capacity_bytes == 0 || data.is_empty() {
            return;
        }
        let blob = self.id(key);
        let mut st = self.state.write().unwrap();
        let blocks = Block::cut(blob, index, data, self.block_bytes as usize);
        for (i, block) in blocks.into_iter().enumerate() {
            let k = BlockKey {
                blob,
                index: index + i as u64,
            };
            if !st.map.contains_key(&k) {
                self.put_ready(&mut st, k, block, None, false);
            }
        }
    }

    /// The number of the blob stored under `key` (the same for every opening of it, so that
    /// its blocks are shared). One entry per blob ever opened: a few dozen bytes each.
    fn id(&self, key: &str) -> u64 {
        let mut ids = self.ids.lock().unwrap();
        let next = ids.len() as u64;
        ids.entry(Arc::from(key)).or_insert((next, None)).0
    }

    /// The size of the blob under `key` if it was opened before and its first block is still
    /// cached: opening it again needs no request.
    pub fn known_size(&self, key: &str) -> Option<u64> {
        let (id, size) = *self.ids.lock().unwrap().get(key)?;
        let size = size?;
        let st = self.state.read().unwrap();
        let first = BlockKey { blob: id, index: 0 };
        (size == 0 || matches!(st.map.get(&first), Some(Slot::Ready(_)))).then_some(size)
    }

    /// Marks a cached block as read (under the read lock): its reference bit, its read count,
    /// and, the first time, the readahead that fetched it succeeded.
    fn touch(&self, r: &Ready) {
        r.referenced.store(true, Ordering::Relaxed);
        r.reads.fetch_add(1, Ordering::Relaxed);
        if r.unread.swap(false, Ordering::Relaxed) {
            if let Some(w) = &r.prefetch {
                self.prefetch_read(w);
                self.admit_to_disk(&r.data);
            }
        }
    }

    /// A prefetched block was read: the stream consumes its readahead, so its window grows
    /// by [`READAHEAD_GROWTH`] blocks (tripling per window consumed).
    fn prefetch_read(&self, w: &Window) {
        self.prefetch_done(w, &self.counters.readahead_used_blocks);
        let max = self.readahead_max_blocks;
        let _ = (w.blocks).fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some((b + READAHEAD_GROWTH).min(max))
        });
    }

    /// A prefetched block is gone unread: wasted, so its stream's window halves.
    fn prefetch_wasted(&self, w: &Window) {
        self.prefetch_done(w, &self.counters.readahead_wasted_blocks);
        w.wasted.fetch_add(1, Ordering::Relaxed);
        let initial = self.readahead_initial_blocks;
        let _ = (w.blocks).fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some((b / 2).max(initial))
        });
    }

    /// A prefetch that failed: nobody can read it, and it was not the stream's fault.
    fn prefetch_failed(&self, w: &Window) {
        self.prefetch_done(w, &AtomicU64::new(0));
    }

    /// A prefetched block is no longer unread (counted in `outcome`).
    fn prefetch_done(&self, w: &Window, outcome: &AtomicU64) {
        let c = &self.counters;
        c.readahead_unread_blocks.fetch_sub(1, Ordering::Relaxed);
        outcome.fetch_add(1, Ordering::Relaxed);
        w.unread.fetch_sub(1, Ordering::Relaxed);
    }

    /// A ready block leaves the map: if it was prefetched and never read, the readahead was
    /// wasted, and a later fetch of the block is a refetch.
    fn forget(&self, st: &mut State, k: BlockKey, r: &Ready) {
        if !r.unread.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Some(w) = &r.prefetch {
            self.prefetch_wasted(w);
        }
        if st.ghosts.insert(k) {
            st.ghost_order.push_back(k);
            if st.ghost_order.len() > GHOSTS_MAX {
                let old = st.ghost_order.pop_front().expect("not empty");
                st.ghosts.remove(&old);
            }
        }
    }

    /// Inserts (or replaces) a ready block and evicts down to the bound: the CLOCK hand
    /// passes over the ring, giving blocks read since its last pass a second chance and
    /// evicting the first one that was not. A prefetched block starts with its bit set, so
    /// the hand passes it once before it can go unread; so does a block a read ended inside
    /// (`second_chance`: the next read of a sequential reader starts in it).
    fn put_ready(
        &self,
        st: &mut State,
        k: BlockKey,
        data: Block,
        prefetch: Option<Arc<Window>>,
        second_chance: bool,
    ) {
        hold(st, &data);
        if !st.ghosts.is_empty() && st.ghosts.remove(&k) {
            self.counters
                .refetched_blocks
                .fetch_add(1, Ordering::Relaxed);
        }
        st.next_seq += 1;
        let seq = st.next_seq;
        let unread = prefetch.is_some();
        let slot = Slot::Ready(Ready {
            data,
            referenced: AtomicBool::new(unread || second_chance),
            reads: AtomicU32::new(0),
            prefetch,
            unread: AtomicBool::new(unread),
            seq,
        });
        // Fetched twice (a reader refetching after a failed readahead raced another): the
        // old copy goes.
        if let Some(Slot::Ready(old)) = st.map.insert(k, slot) {
            self.counters
                .refetched_blocks
                .fetch_add(1, Ordering::Relaxed);
            self.forget(st, k, &old);
            let n = self.release(st, &old.data);
            self.counters.evicted_blocks.fetch_add(n, Ordering::Relaxed);
        }
        st.ring.push_back((k, seq));
        // Each pass clears the bits it skips, so two passes over the ring always evict.
        let mut budget = 2 * st.ring.len() + 1;
        while st.held_bytes > self.capacity_bytes && budget > 0 {
            budget -= 1;
            let Some((victim, vseq)) = st.ring.pop_front() else {
                break;
            };
            let live = |s: Option<&Slot>| matches!(s, Some(Slot::Ready(r)) if r.seq == vseq);
            if !live(st.map.get(&victim)) {
                continue; // a stale entry: that insertion was evicted already
            }
            if let Some(Slot::Ready(r)) = st.map.get(&victim) {
                if r.referenced.swap(false, Ordering::Relaxed) {
                    st.ring.push_back((victim, vseq));
                    continue;
                }
            }
            if let Some(Slot::Ready(r)) = st.map.remove(&victim) {
                self.forget(st, victim, &r);
                let n = 1 + self.release(st, &r.data);
                self.counters.evicted_blocks.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Counts a block leaving the cache. When fewer than half of its buffer's blocks remain,
    /// the hot ones (read since the clock hand last passed, or [`HOT_READS`] times) are copied
    /// into buffers of their own and the others are evicted with it (after a scan they are
    /// next anyway), so the big buffer can be freed. Returns how many blocks that evicted.
    /// Their ring entries become stale and are dropped when the hand reaches them.
    fn release(&self, st: &mut State, b: &Block) -> u64 {
        let run = &b.run;
        let left = run.cached.fetch_sub(1, Ordering::Relaxed) - 1;
        if left == 0 {
            st.held_bytes -= run.bytes.capacity() as u64;
            return 0;
        }
        if left * 2 >= run.blocks {
            return 0;
        }
        let mut cold = Vec::new();
        for index in run.first..run.first + run.blocks {
            let k = BlockKey {
                blob: run.blob,
                index,
            };
            let Some(Slot::Ready(r)) = st.map.get_mut(&k) else {
                continue;
            };
            if !Arc::ptr_eq(&r.data.run, run) {
                continue;
            }
            let hot = r.referenced.load(Ordering::Relaxed)
                || r.reads.load(Ordering::Relaxed) >= HOT_READS;
            if !hot {
                cold.push(k);
                continue;
            }
            let len = r.data.len();
            let copy = Block::cut(run.blob, index, r.data.bytes().to_vec(), len).swap_remove(0);
            copy.run.cached.store(1, Ordering::Relaxed);
            r.data = copy;
            st.held_bytes += len as u64;
            self.counters.copied_blocks.fetch_add(1, Ordering::Relaxed);
            if run.cached.fetch_sub(1, Ordering::Relaxed) == 1 {
                st.held_bytes -= run.bytes.capacity() as u64;
            }
        }
        for k in &cold {
            if let Some(Slot::Ready(r)) = st.map.remove(k) {
                self.forget(st, *k, &r);
            }
            if run.cached.fetch_sub(1, Ordering::Relaxed) == 1 {
                st.held_bytes -= run.bytes.capacity() as u64;
            }
        }
        cold.len() as u64
    }
}

/// Blocks `first..` of a blob, cut from one buffer back to back, for the disk tier; `cost`
/// bytes are counted against its queue's bound while queued.
struct DiskJob {
    blob: u64,
    first: u64,
    blocks: Blocks,
    cost: u64,
}

/// Most queued jobs the disk writer takes at once (to write neighbours together).
const DISK_JOBS_BATCH_MAX: usize = 1024;

/// The disk tier's writer thread: takes what is queued, joins blocks that are neighbours
/// both in their blob and in one fetch buffer (prefetched blocks come one job per block, as
/// they are read), and writes each such run with one call. Ends when the cache goes.
fn write_to_disk(disk: &DiskCache, jobs: &mpsc::Receiver<DiskJob>, queued: &AtomicU64) {
    while let Ok(job) = jobs.recv() {
        let mut batch = vec![job];
        while batch.len() < DISK_JOBS_BATCH_MAX {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let blocks: Vec<(u64, u64, &Block)> = (batch.iter())
            .flat_map(|j| {
                (j.blocks.iter().enumerate()).map(|(i, b)| (j.blob, j.first + i as u64, b))
            })
            .collect();
        let mut a = 0;
        while a < blocks.len() {
            let mut z = a;
            while z + 1 < blocks.len() && {
                let ((blob, index, prev), (next_blob, next_index, next)) =
                    (blocks[z], blocks[z + 1]);
                next_blob == blob
                    && next_index == index + 1
                    && Arc::ptr_eq(&prev.run, &next.run)
                    && prev.start + prev.len == next.start
            } {
                z += 1;
            }
            let (blob, first, head) = blocks[a];
            let tail = blocks[z].2;
            disk.put_run(
                blob,
                first,
                &head.run.bytes[head.start..tail.start + tail.len],
            );
            a = z + 1;
        }
        let cost: u64 = batch.iter().map(|j| j.cost).sum();
        queued.fetch_sub(cost, Ordering::Relaxed);
    }
}

/// Counts a block entering the cache (its buffer's capacity, if it is the buffer's first).
fn hold(st: &mut State, b: &Block) {
    if b.run.cached.fetch_add(1, Ordering::Relaxed) == 0 {
        st.held_bytes += b.run.bytes.capacity() as u64;
    }
}

/// The buffer one fetch filled, shared by the blocks cut from it.
struct Run {
    bytes: Vec<u8>,
    /// The blob and first block of the run, to find its blocks again.
    blob: u64,
    first: u64,
    blocks: u64,
    /// Bytes of the fetch this buffer was part of (a fetch fills several buffers).
    fetch_bytes: usize,
    /// Blocks of this run in the cache. Changed only under the state lock.
    cached: AtomicU64,
}

impl Drop for Run {
    fn drop(&mut self) {
        give_buffer(std::mem::take(&mut self.bytes));
    }
}

/// Fetch buffers no longer used by any block, for the next fetches: a fresh buffer of a
/// megabyte or more comes from the kernel (`memory::MMAP_THRESHOLD_BYTES`) and costs a page
/// fault and a zeroed page per 4 KiB on first write (a fifth of the CPU of a cold
/// sequential read, measured); a recycled one neither. Fetches are cut into segments of
/// one size ([`SEGMENT_BYTES`]) so that any freed buffer fits any later fetch. Bounded by
/// [`POOL_BYTES_MAX`] (extra memory beyond the cache's bound).
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Bytes of free buffers kept for reuse: what the readahead threads have in flight
/// ([`READAHEAD_THREADS`] GETs of [`FETCH_BYTES_MAX`]), which is about what the evictions
/// that make room for them hand back.
pub const POOL_BYTES_MAX: usize = READAHEAD_THREADS * FETCH_BYTES_MAX as usize;

/// Buffers smaller than this are not worth keeping (they come from the allocator's heap,
/// which reuses them anyway).
pub const POOL_BUFFER_BYTES_MIN: usize = 1 << 20;

/// A fetch's buffers are segments of this many bytes (rounded up to whole blocks), the last
/// one shorter: every segment of a cache has one size, so a freed one serves any later fetch
/// (buffers of the fetch's own length rarely matched the next fetch's).
pub const SEGMENT_BYTES: u64 = 1 << 20;

/// A buffer of `len` bytes for a fetch (contents unspecified): a recycled one of exactly
/// that capacity if there is one, else new.
pub fn take_buffer(len: usize) -> Vec<u8> {
    if len >= POOL_BUFFER_BYTES_MIN {
        let mut pool = BUFFERS.lock().unwrap();
        // Exactly: a larger buffer would be counted whole against the cache bound.
        if let Some(i) = pool.iter().position(|b| b.capacity() == len) {
            let mut b = pool.swap_remove(i);
            drop(pool);
            // Only bytes never initialized are zeroed (none: pooled buffers were full).
            b.resize(len, 0);
            return b;
        }
        let b = vec![0; len];
        populate(&b);
        return b;
    }
    vec![0; len]
}

/// Maps a fresh buffer's pages in one system call instead of one page fault each as a GET's
/// body lands in it (a cold read's buffers are mostly fresh until the cache is full: at
/// ~3 µs a fault, a fifth of the read path's CPU). Best effort: on kernels without
/// `MADV_POPULATE_WRITE` (before 5.14) the pages fault in as before.
fn populate(b: &[u8]) {
    const PAGE: usize = 4096;
    let start = (b.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (b.as_ptr() as usize + b.len()) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies inside `b`'s allocation, which stays mapped; populating
        // pages changes no contents (they are zero already, as `vec![0; n]` left them).
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
}

fn give_buffer(b: Vec<u8>) {
    if b.capacity() >= POOL_BUFFER_BYTES_MIN {
        let mut pool = BUFFERS.lock().unwrap();
        let held: usize = pool.iter().map(Vec::capacity).sum();
        if held + b.capacity() <= POOL_BYTES_MAX {
            pool.push(b);
        }
    }
}

/// One cached block: a range of the buffer its fetch filled. The blocks of one ranged read
/// share that buffer, so caching them copies nothing. The cache counts a buffer's whole size
/// while any of its blocks is cached, and copies the last few out once most are evicted (so
/// that a hot block does not keep a large buffer alive).
#[derive(Clone)]
pub struct Block {
    run: Arc<Run>,
    start: usize,
    len: usize,
}

impl Block {
    /// `bytes` (blocks `first..`, the last possibly short) cut into blocks of `block_bytes`.
    fn cut(blob: u64, first: u64, bytes: Vec<u8>, block_bytes: usize) -> Vec<Block> {
        let len = bytes.len();
        Block::cut_part(blob, first, bytes, block_bytes, len)
    }

    /// [`Block::cut`] for one buffer of a fetch of `fetch_bytes`.
    fn cut_part(
        blob: u64,
        first: u64,
        bytes: Vec<u8>,
        block_bytes: usize,
        fetch_bytes: usize,
    ) -> Vec<Block> {
        let len = bytes.len();
        let run = Arc::new(Run {
            blob,
            first,
            blocks: len.div_ceil(block_bytes) as u64,
            fetch_bytes,
            bytes,
            cached: AtomicU64::new(0),
        });
        (0..len)
            .step_by(block_bytes)
            .map(|at| Block {
                run: run.clone(),
                start: at,
                len: block_bytes.min(len - at),
            })
            .collect()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.run.bytes[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where a cached blob's bytes come from: [`BlockCache::wrap`] adapts any [`BlobReader`];
/// a store that receives bytes itself (S3) implements this to read them straight into the
/// cache's buffers.
pub trait Source: Send + Sync {
    /// Fills `parts` with the bytes at `offset` (inside the blob), back to back, with one
    /// read of the store, and returns them (each at its length). The cache keeps them as
    /// its blocks and recycles them once those are gone.
    fn fetch(&self, offset: u64, parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>;
    /// [`BlobReader::read_at`], for reads that bypass the cache.
    fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn size_bytes(&self) -> u64;
}

/// Copies `bytes` into `parts`, back to back (their lengths add up to `bytes.len()`): for a
/// [`Source`] that received a fetch's bytes in one piece.
pub fn fill_parts(parts: &mut [Vec<u8>], bytes: &[u8]) {
    let mut at = 0;
    for part in parts {
        let n = part.len();
        part.copy_from_slice(&bytes[at..at + n]);
        at += n;
    }
}

struct ReaderSource(Box<dyn BlobReader>);

/// One `read_at` per fetch (tests count them), then copied into the parts: a reader wrapped
/// this way is a test's or a local one, not worth a vectored read.
impl Source for ReaderSource {
    fn fetch(&self, offset: u64, mut parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if let [part] = &mut parts[..] {
            self.0.read_at(offset, part)?;
            return Ok(parts);
        }
        let mut buf = vec![0; parts.iter().map(Vec::len).sum()];
        self.0.read_at(offset, &mut buf)?;
        fill_parts(&mut parts, &buf);
        Ok(parts)
    }

    fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_at(offset, buf)
    }

    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
}

/// The blocks of one fetched run, in order.
type Blocks = Vec<Block>;

/// What a read does about one block.
enum Plan {
    Have(Block),
    Wait(Arc<Flight>),
    Fetch(Arc<Flight>),
}

/// A blob read through a [`BlockCache`].
pub struct CachedBlob {
    shared: Arc<Blob>,
}

/// What a [`CachedBlob`] shares with its readahead jobs.
struct Blob {
    cache: Arc<BlockCache>,
    /// The number its block keys use.
    id: u64,
    /// The blob's key, for messages.
    key: Arc<str>,
    inner: Box<dyn Source>,
    /// Its sequential streams, each with its readahead window.
    seq: Mutex<Streams<Arc<Window>>>,
}

/// Readahead to issue for a stream: blocks `[from, to)`.
struct Ahead {
    window: Arc<Window>,
    from: u64,
    to: u64,
    /// The stream's whole window, in blocks (at least `to - from`): whether its GETs are
    /// aligned ([`aligned_end`]).
    span: u64,
}

impl Blob {
    fn key(&self, index: u64) -> BlockKey {
        BlockKey {
            blob: self.id,
            index,
        }
    }

    fn blocks(&self) -> u64 {
        self.inner.size_bytes().div_ceil(self.cache.block_bytes)
    }

    /// All of blocks `[first, last]` if they are cached (marked as read), under the read
    /// lock: the common case of a warm cache takes no exclusive lock.
    fn hits(&self, first: u64, last: u64) -> Option<Vec<Plan>> {
        let c = &self.cache;
        let st = c.state.read().unwrap();
        let mut plans = Vec::with_capacity((last - first + 1) as usize);
        for index in first..=last {
            let Some(Slot::Ready(r)) = st.map.get(&self.key(index)) else {
                return None;
            };
            c.touch(r);
            plans.push(Plan::Have(r.data.clone()));
        }
        c.counters
            .hit_blocks
            .fetch_add(plans.len() as u64, Ordering::Relaxed);
        Some(plans)
    }

    /// Decides, under the write lock, which blocks are present, awaited or ours to fetch.
    /// `ends_inside`: the read ends inside block `last`, so the block gets a second chance
    /// once it lands (`put_ready`), also when it was a prefetch this read joined; marked
    /// under the lock, before the flight can land.
    fn plan(&self, first: u64, last: u64, ends_inside: bool) -> Vec<Plan> {
        if let Some(p) = self.hits(first, last) {
            return p;
        }
        let c = &self.cache;
        let mut st = c.state.write().unwrap();
        let mut plans = Vec::with_capacity((last - first + 1) as usize);
        for index in first..=last {
            let k = self.key(index);
            let plan = match st.map.get(&k) {
                Some(Slot::Ready(r)) => {
                    c.touch(r);
                    c.counters.hit_blocks.fetch_add(1, Ordering::Relaxed);
                    Plan::Have(r.data.clone())
                }
                Some(Slot::Loading(f)) => {
                    c.counters.joined_blocks.fetch_add(1, Ordering::Relaxed);
                    f.joined.store(true, Ordering::Relaxed);
                    if ends_inside && index == last {
                        f.read_again.store(true, Ordering::Relaxed);
                    }
                    Plan::Wait(f.clone())
                }
                None => {
                    let f = Flight::new(None);
                    if ends_inside && index == last {
                        f.read_again.store(true, Ordering::Relaxed);
                    }
                    st.map.insert(k, Slot::Loading(f.clone()));
                    c.counters.miss_blocks.fetch_add(1, Ordering::Relaxed);
                    Plan::Fetch(f)
                }
            };
            plans.push(plan);
        }
        plans
    }

    /// Gets blocks `[start, start + n)` and publishes them (or the error) to the cache and to
    /// every reader waiting for them: those the disk tier holds from there, the others with
    /// one read of the underlying source per contiguous run.
    fn fetch_run(&self, start: u64, flights: &[Arc<Flight>]) -> Result<Blocks> {
        let Some(disk) = &self.cache.disk else {
            return self.fetch_remote(start, flights);
        };
        let bs = self.cache.block_bytes;
        let size = self.inner.size_bytes();
        let wanted: Vec<((u64, u64), usize)> = (start..start + flights.len() as u64)
            .map(|index| {
                (
                    (self.id, index),
                    (((index + 1) * bs).min(size) - index * bs) as usize,
                )
            })
            .collect();
        let mut out: Vec<Option<Block>> = (disk.cache.get_many(&wanted).into_iter())
            .zip(&wanted)
            .map(|(bytes, ((_, index), _))| {
                Some(Block::cut(self.id, *index, bytes?, bs as usize).swap_remove(0))
            })
            .collect();
        if out.iter().all(Option::is_none) {
            return self.fetch_remote(start, flights);
        }
        let mut st = self.cache.state.write().unwrap();
        for (i, data) in out.iter().enumerate() {
            if let Some(data) = data {
                self.publish(&mut st, start + i as u64, &flights[i], data);
            }
        }
        drop(st);
        for (f, data) in flights.iter().zip(&out) {
            if let Some(data) = data {
                f.finish(Ok(data.clone()));
            }
        }
        // The rest, in contiguous runs; after a failure the remaining runs fail unfetched.
        let mut failed: Option<Error> = None;
        let mut i = 0;
        while i < out.len() {
            if out[i].is_some() {
                i += 1;
                continue;
            }
            let j = (i..out.len())
                .find(|&j| out[j].is_some())
                .unwrap_or(out.len());
            let index = start + i as u64;
            match &failed {
                Some(e) => self.fail(index, &flights[i..j], e),
                None => match self.fetch_remote(index, &flights[i..j]) {
                    Ok(blocks) => {
                        for (slot, b) in out[i..j].iter_mut().zip(blocks) {
                            *slot = Some(b);
                        }
                    }
                    Err(e) => failed = Some(e),
                },
            }
            i = j;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out
                .into_iter()
                .map(|b| b.expect("every block got"))
                .collect()),
        }
    }

    /// Fetches blocks `[start, start + n)` with one read of the source, publishes them and
    /// hands them to the disk tier.
    fn fetch_remote(&self, start: u64, flights: &[Arc<Flight>]) -> Result<Blocks> {
        let bs = self.cache.block_bytes;
        let n = flights.len() as u64;
        let end = ((start + n) * bs).min(self.inner.size_bytes());
        let len = (end - start * bs) as usize;
        let c = &self.cache.counters;
        c.fetches.fetch_add(1, Ordering::Relaxed);
        let seg = self.cache.segment_bytes as usize;
        let parts: Vec<Vec<u8>> = (0..len)
            .step_by(seg)
            .map(|at| take_buffer(seg.min(len - at)))
            .collect();
        let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
        let r = self.inner.fetch(start * bs, parts).and_then(|parts| {
            if parts.iter().map(Vec::len).eq(lens.iter().copied()) {
                Ok(parts)
            } else {
                let got: usize = parts.iter().map(Vec::len).sum();
                Err(Error::Remote {
                    key: self.key.to_string(),
                    message: format!("asked for {len} bytes, got {got}"),
                })
            }
        });
        match r {
            Ok(parts) => {
                c.fetched_bytes.fetch_add(len as u64, Ordering::Relaxed);
                let mut blocks = Vec::with_capacity(flights.len());
                for part in parts {
                    let index = start + blocks.len() as u64;
                    blocks.extend(Block::cut_part(self.id, index, part, bs as usize, len));
                }
                let mut st = self.cache.state.write().unwrap();
                for (i, (f, data)) in flights.iter().zip(&blocks).enumerate() {
                    self.publish(&mut st, start + i as u64, f, data);
                }
                drop(st);
                for (f, data) in flights.iter().zip(&blocks) {
                    f.finish(Ok(data.clone()));
                }
                // Readahead's blocks go to the disk tier only once read (`admit_to_disk`):
                // a prefetch that nobody reads must not push a reader's blocks off the disk.
                // (A reader's run may go on with readahead merged into it: its own blocks
                // come first.)
                let own = flights.iter().take_while(|f| f.prefetch.is_none()).count();
                if own > 0 {
                    // The buffers those blocks keep alive while queued.
                    let cost = (blocks[..own].iter())
                        .filter(|b| b.start == 0)
                        .map(|b| b.run.bytes.capacity() as u64)
                        .sum();
                    self.cache
                        .offer_to_disk(self.id, start, &blocks[..own], cost);
                }
                Ok(blocks)
            }
            Err(e) => {
                self.fail(start, flights, &e);
                Err(e)
            }
        }
    }

    /// Puts a fetched block in the cache. The caller then finishes its flight, handing the
    /// block to the readers waiting for it, once the state lock is released (waking them is
    /// a system call, and they would wake to find the lock held).
    fn publish(&self, st: &mut State, index: u64, f: &Flight, data: &Block) {
        let mut prefetch = f.prefetch.clone();
        // A reader already waits for it: read on arrival.
        if f.joined.load(Ordering::Relaxed) {
            if let Some(w) = prefetch.take() {
                self.cache.prefetch_read(&w);
                self.cache.admit_to_disk(data);
            }
        }
        let again = f.read_again.load(Ordering::Relaxed);
        let k = self.key(index);
        self.cache.put_ready(st, k, data.clone(), prefetch, again);
    }

    /// Fails the flights of blocks `[start, start + n)`: nothing is cached, their waiters get
    /// the error.
    fn fail(&self, start: u64, flights: &[Arc<Flight>], e: &Error) {
        let mut st = self.cache.state.write().unwrap();
        for (i, f) in flights.iter().enumerate() {
            st.map.remove(&self.key(start + i as u64));
            if let Some(w) = &f.prefetch {
                self.cache.prefetch_failed(w);
            }
            f.finish(Err(clone_error(e)));
        }
    }

    /// Notes a read of blocks `[first, last]`; returns the readahead to issue, if any. Which
    /// stream a read follows is [`Streams::follows`]' rule (up to [`STREAMS_MAX`] per blob,
    /// the scan hint's too). A stream that has read
    /// [`SEQUENTIAL_READS_MIN`] times forward keeps its window fetched ahead of it: when less
    /// than half of it is, the rest of the window is issued — unless the stream has not read
    /// as much as a window of what was prefetched for it (it is not consuming).
    fn note_read(&self, first: u64, last: u64) -> Option<Ahead> {
        let c = &self.cache;
        if c.readahead_max_blocks == 0 {
            return None;
        }
        // Never wait for it: a read that finds another one noting is not noted (a stream's
        // other reads still are), which keeps warm random reads from queueing here.
        let Ok(mut q) = self.seq.try_lock() else {
            return None;
        };
        let read_blocks = last - first + 1;
        let fresh = || {
            let blocks = (READAHEAD_INITIAL_READS * read_blocks)
                .clamp(c.readahead_initial_blocks, c.readahead_max_blocks);
            Window::new(blocks, last + 1)
        };
        let followed = q.follows(first, last, c.block_bytes, fresh)?;
        let s = followed.stream;
        if followed.advanced_from.is_some() {
            // The stream's first reads may have been small (a layer's header and index).
            let floor = (READAHEAD_INITIAL_READS * read_blocks).min(c.readahead_max_blocks);
            s.state.blocks.fetch_max(floor, Ordering::Relaxed);
        }
        if s.streak < SEQUENTIAL_READS_MIN {
            return None;
        }
        let w = &s.state;
        let size = w.blocks.load(Ordering::Relaxed);
        let from = w.ahead_until.load(Ordering::Relaxed).max(last + 1);
        let mut to = (last + 1 + size).min(self.blocks());
        // Whole, aligned GETs only (see `read_ahead`): a window's ragged end waits for the
        // next round, rather than going out as a GET of a block or two.
        let per_fetch = c.fetch_blocks;
        if to > from + per_fetch {
            to -= to % per_fetch;
        }
        let enough = from - (last + 1) >= size / 2;
        let spent =
            c.counters.readahead_unread_blocks.load(Ordering::Relaxed) >= c.readahead_budget_blocks;
        if enough || spent || from >= to || w.unread.load(Ordering::Relaxed) >= size {
            return None;
        }
        Some(Ahead {
            window: w.clone(),
            from,
            to,
            span: size,
        })
    }

    /// Issues a stream's readahead: marks the missing blocks of `[from, to)` as loading (as
    /// many as the cache's readahead budget allows) and fetches them in runs of at most
    /// [`FETCH_BYTES_MAX`] on the readahead threads. If `reader_run` (the reader's own last
    /// run of missing blocks) ends right where the readahead starts, the first readahead
    /// run joins it instead: one GET rather than two, and the readers arriving for those
    /// blocks wait for it rather than fetching their own (at the start of each layer of an
    /// image read in order, many reads are in flight before any readahead is).
    /// Returns the block up to which readahead was issued or found present (`to` unless the
    /// budget ran out), and how many blocks it issued.
    fn read_ahead(
        self: &Arc<Self>,
        a: Ahead,
        reader_run: Option<&mut (u64, Vec<Arc<Flight>>)>,
    ) -> (u64, u64) {
        let c = &self.cache;
        let per_fetch = c.fetch_blocks;
        let budget = c.readahead_budget_blocks;
        let blocks = self.blocks();
        let to = aligned_end(a.from, a.to, a.span, per_fetch, blocks);
        let mut runs: Vec<(u64, Vec<Arc<Flight>>)> = Vec::new();
        let mut issued_to = a.from;
        {
            let mut st = c.state.write().unwrap();
            for index in a.from..to {
                let unread = c.counters.readahead_unread_blocks.load(Ordering::Relaxed);
                if index == a.from || run_starts_at(index, per_fetch, blocks) {
                    // A large GET the budget would cut short waits for the next round, whole
                    // (unless it is longer than the whole budget).
                    let n = (index + 1).next_multiple_of(per_fetch).min(to) - index;
                    if n * 2 >= per_fetch && unread + n > budget && n <= budget {
                        break;
                    }
                }
                if let Entry::Vacant(slot) = st.map.entry(self.key(index)) {
                    if unread >= budget {
                        break;
                    }
                    c.counters
                        .readahead_unread_blocks
                        .fetch_add(1, Ordering::Relaxed);
                    a.window.unread.fetch_add(1, Ordering::Relaxed);
                    let f = Flight::new(Some(a.window.clone()));
                    slot.insert(Slot::Loading(f.clone()));
                    match runs.last_mut() {
                        Some((s, fs))
                            if *s + fs.len() as u64 == index
                                && !run_starts_at(index, per_fetch, blocks) =>
                        {
                            fs.push(f)
                        }
                        _ => runs.push((index, vec![f])),
                    }
                }
                issued_to = index + 1;
            }
        }
        a.window.ahead_until.fetch_max(issued_to, Ordering::Relaxed);
        let issued: usize = runs.iter().map(|(_, fs)| fs.len()).sum();
        let mut runs = runs.into_iter().peekable();
        if let (Some((start, fs)), Some((next, _))) = (reader_run, runs.peek()) {
            if *start + fs.len() as u64 == *next {
                let (_, mut ahead) = runs.next().expect("peeked");
                let room = (per_fetch as usize)
                    .saturating_sub(fs.len())
                    .min(ahead.len());
                let rest = ahead.split_off(room);
                c.counters
                    .readahead_blocks
                    .fetch_add(ahead.len() as u64, Ordering::Relaxed);
                fs.extend(ahead);
                if !rest.is_empty() {
                    let at = *start + fs.len() as u64;
                    self.dispatch(vec![(at, rest)]);
                }
            }
        }
        self.dispatch(runs.collect());
        (issued_to, issued as u64)
    }

    /// Fetches readahead runs on the readahead threads.
    fn dispatch(self: &Arc<Self>, runs: Vec<(u64, Vec<Arc<Flight>>)>) {
        let c = &self.cache;
        let pool = c.pool.lock().unwrap();
        for (start, flights) in runs {
            c.counters
                .readahead_blocks
                .fetch_add(flights.len() as u64, Ordering::Relaxed);
            let blob = self.clone();
            pool.execute(move || {
                if let Err(e) = blob.fetch_run(start, &flights) {
                    log::warn!("readahead of {} failed: {e}", blob.key);
                }
            });
        }
    }
}

impl BlobReader for CachedBlob {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let b = &self.shared;
        let size = b.inner.size_bytes();
        let end = offset.checked_add(buf.len() as u64);
        if buf.is_empty() || end.is_none_or(|e| e > size) {
            // Nothing to cache; the reader says what is wrong with the range, if anything.
            return b.inner.read_into(offset, buf);
        }
        let end = end.unwrap();
        let c = &b.cache;
        let bs = c.block_bytes;
        c.counters
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let (first, last) = (offset / bs, (end - 1) / bs);
        if c.capacity_bytes == 0 || (last - first + 1) * bs > c.capacity_bytes / 2 {
            c.counters.bypass_reads.fetch_add(1, Ordering::Relaxed);
            return b.inner.read_into(offset, buf);
        }
        let mut plans = b.plan(first, last, !end.is_multiple_of(bs));
        // Runs of blocks to fetch: (first block, flights), each at most FETCH_BYTES_MAX.
        let per_fetch = c.fetch_blocks as usize;
        let mut runs: Vec<(u64, Vec<Arc<Flight>>)> = Vec::new();
        for (i, p) in plans.iter().enumerate() {
            let Plan::Fetch(f) = p else { continue };
            let index = first + i as u64;
            match runs.last_mut() {
                Some((s, fs)) if *s + fs.len() as u64 == index && fs.len() < per_fetch => {
                    fs.push(f.clone())
                }
                _ => runs.push((index, vec![f.clone()])),
            }
        }
        if let Some(ahead) = b.note_read(first, last) {
            b.read_ahead(ahead, runs.last_mut());
        }
        let fetched: Vec<Result<Blocks>> = if runs.len() <= 1 {
            runs.iter().map(|(s, fs)| b.fetch_run(*s, fs)).collect()
        } else {
            fetch_parallel(b, &runs)
        };
        for ((start, _), r) in runs.iter().zip(fetched) {
            // A run may go on past `last` with readahead merged into it.
            for (j, data) in r?.into_iter().enumerate() {
                if let Some(p) = plans.get_mut((start - first) as usize + j) {
                    *p = Plan::Have(data);
                }
            }
        }
        // Blocks of one fetch are handed over in order: waiting for the last one first means
        // one wake-up for the lot, not one per block.
        if let Some(Plan::Wait(f) | Plan::Fetch(f)) =
            (plans.iter()).rfind(|p| matches!(p, Plan::Wait(_) | Plan::Fetch(_)))
        {
            let _ = f.wait();
        }
        for (i, p) in plans.iter().enumerate() {
            let index = first + i as u64;
            let data = match p {
                Plan::Have(d) => d.clone(),
                Plan::Wait(f) | Plan::Fetch(f) => match f.wait() {
                    Ok(d) => d,
                    // A failed readahead is not this reader's failure: fetch it ourselves.
                    Err(_) if f.prefetch.is_some() => {
                        let flight = Flight::new(None);
                        b.fetch_run(index, std::slice::from_ref(&flight))?;
                        flight.wait()?
                    }
                    Err(e) => return Err(e),
                },
            };
            let block_start = index * bs;
            let from = offset.max(block_start);
            let to = end.min(block_start + data.len() as u64);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let src = &data.bytes()[(from - block_start) as usize..(to - block_start) as usize];
            dst.copy_from_slice(src);
        }
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.shared.inner.size_bytes()
    }

    /// Drops the ready blocks of the range from memory and from the disk tier (blocks being
    /// fetched are left to their fetch), then reads the range from the source.
    fn refetch(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let b = &self.shared;
        let c = &b.cache;
        let end = offset.saturating_add(buf.len() as u64);
        if !buf.is_empty() && end <= b.inner.size_bytes() {
            let bs = c.block_bytes;
            let keys: Vec<BlockKey> = (offset / bs..=(end - 1) / bs).map(|i| b.key(i)).collect();
            let mut st = c.state.write().unwrap();
            for k in &keys {
                if !matches!(st.map.get(k), Some(Slot::Ready(_))) {
                    continue;
                }
                if let Some(Slot::Ready(r)) = st.map.remove(k) {
                    c.forget(&mut st, *k, &r);
                    let n = 1 + c.release(&mut st, &r.data);
                    c.counters.evicted_blocks.fetch_add(n, Ordering::Relaxed);
                }
            }
            drop(st);
            if let Some(d) = &c.disk {
                let on_disk: Vec<_> = keys.iter().map(|k| (k.blob, k.index)).collect();
                d.cache.remove(&on_disk);
            }
        }
        b.inner.read_into(offset, buf)
    }

    /// Issues readahead for `scan` of the blocks of `[offset, offset + len)` not cached or
    /// being fetched, as far as the readahead budget allows, on the readahead threads.
    fn prefetch(&self, offset: u64, len: u64, scan: &ScanWindow) -> bool {
        let b = &self.shared;
        let c = &b.cache;
        let end = offset.saturating_add(len).min(b.inner.size_bytes());
        if c.capacity_bytes == 0 || c.readahead_max_blocks == 0 || offset >= end {
            return true;
        }
        let bs = c.block_bytes;
        let to = end.div_ceil(bs);
        let a = Ahead {
            window: scan.window.clone(),
            from: offset / bs,
            to,
            span: to - offset / bs,
        };
        let (issued_to, issued) = b.read_ahead(a, None);
        (c.counters.scan_blocks).fetch_add(issued, Ordering::Relaxed);
        issued_to >= to
    }
}

/// Where readahead of blocks `[from, to)` ends, for a stream whose window is `span` blocks.
/// Once the window is at least half a GET (`per_fetch` blocks), at a multiple of
/// `per_fetch` (or at the blob's end, `blocks`, if that is a short tail away); before, as
/// asked. With runs split at the same multiples ([`run_starts_at`]), a sequential stream's
/// GETs are whole and aligned once its window has grown, however its windows fall: each GET
/// costs the object store a fixed amount besides its bytes (SeaweedFS spends about as much
/// CPU on a ragged 1 MiB GET as on half an 8 MiB one). Small windows are not lengthened:
/// with many streams sharing the budget, or a delta layer's few pages of each stretch of the
/// image, what they would add would sit unread in the cache until evicted.
fn aligned_end(from: u64, to: u64, span: u64, per_fetch: u64, blocks: u64) -> u64 {
    if to <= from || span.max(to - from) * 2 < per_fetch {
        return to;
    }
    let end = to.next_multiple_of(per_fetch);
    if blocks.saturating_sub(end) <= per_fetch / TAIL_DIVISOR {
        return blocks;
    }
    end
}

/// A blob's last `per_fetch / TAIL_DIVISOR` blocks or fewer past a GET boundary (a layer's
/// trailer) join the GET before them rather than going as one of their own.
const TAIL_DIVISOR: u64 = 8;

/// Whether readahead starts a new run (a new GET) at block `index`: at multiples of
/// `per_fetch`, except before a short tail of the blob.
fn run_starts_at(index: u64, per_fetch: u64, blocks: u64) -> bool {
    index.is_multiple_of(per_fetch) && blocks - index > per_fetch / TAIL_DIVISOR
}

/// Fetches several runs at once, at most [`FETCH_PARALLEL_MAX`] at a time.
fn fetch_parallel(blob: &Blob, runs: &[(u64, Vec<Arc<Flight>>)]) -> Vec<Result<Blocks>> {
    let mut out: Vec<Option<Result<Blocks>>> = (0..runs.len()).map(|_| None).collect();
    for (chunk, slots) in runs
        .chunks(FETCH_PARALLEL_MAX)
        .zip(out.chunks_mut(FETCH_PARALLEL_MAX))
    {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(start, fs)| s.spawn(move || blob.fetch_run(*start, fs)))
                .collect();
            for (h, slot) in handles.into_iter().zip(slots.iter_mut()) {
                *slot = Some(h.join().expect("cache fetch thread panicked"));
            }
        });
    }
    out.into_iter()
        .map(|r| r.expect("every run fetched"))
        .collect()
}

/// A copy of a store error for the other readers of a failed fetch (`io::Error` is not
/// `Clone`; its kind and message are kept).
fn clone_error(e: &Error) -> Error {
    match e {
        Error::NotFound { key } => Error::NotFound { key: key.clone() },
        Error::Io { key, op, source } => Error::Io {
            key: key.clone(),
            op,
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::Remote { key, message } => Error::Remote {
            key: key.clone(),
            message: message.clone(),
        },
        Error::Unavailable { key, message } => Error::Unavailable {
            key: key.clone(),
            message: message.clone(),
        },
        Error::BadKey { key } => Error::BadKey { key: key.clone() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Barrier;
    use std::time::Duration;

    /// An in-memory blob that counts reads, can be slowed down, and can be made to fail.
    struct Counting {
        data: Vec<u8>,
        reads: Arc<Mutex<Vec<(u64, usize)>>>,
        delay: Duration,
        fail: Arc<AtomicBool>,
    }

    impl BlobReader for Counting {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let end = offset as usize + buf.len();
            if end > self.data.len() {
                return Err(Error::Remote {
                    key: "k".into(),
                    message: "past the end".into(),
                });
            }
            self.reads.lock().unwrap().push((offset, buf.len()));
            std::thread::sleep(self.delay);
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::Unavailable {
                    key: "k".into(),
                    message: "injected".into(),
                });
            }
            buf.copy_from_slice(&self.data[offset as usize..end]);
            Ok(())
        }

        fn size_bytes(&self) -> u64 {
            self.data.len() as u64
        }
    }

    type Reads = Arc<Mutex<Vec<(u64, usize)>>>;

    fn blob(cache: &Arc<BlockCache>, key: &str, size: usize, delay_ms: u64) -> (CachedBlob, Reads) {
        let reads = Reads::default();
        let data = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
        let inner = Counting {
            data,
            reads: reads.clone(),
            delay: Duration::from_millis(delay_ms),
            fail: Arc::default(),
        };
        (cache.wrap(key, Box::new(inner)), reads)
    }

    fn expect(offset: u64, len: usize) -> Vec<u8> {
        (offset as usize..offset as usize + len)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect()
    }

    fn read(b: &CachedBlob, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        b.read_at(offset, &mut buf).unwrap();
        buf
    }

    const KIB: u64 = 1024;

    /// Ring entries of blocks still cached (the others are stale, skipped by the hand).
    fn live_ring_entries(st: &State) -> usize {
        let live = |(k, seq): &&(BlockKey, u64)| matches!(st.map.get(k), Some(Slot::Ready(r)) if r.seq == *seq);
        st.ring.iter().filter(live).count()
    }

    /// A cache whose reads are never taken for a stream (these tests read blocks a few
    /// hundred KiB apart, close enough to look sequential).
    fn no_readahead(capacity_bytes: u64, block_bytes: u64) -> BlockCache {
        let mut c = BlockCache::new(capacity_bytes, block_bytes).unwrap();
        c.readahead_max_blocks = 0;
        c
    }

    fn window(blocks: u64) -> Arc<Window> {
        Window::new(blocks, 0)
    }

    #[test]
    fn repeat_reads_hit_and_bytes_are_right_at_any_offset() {
        let cache = Arc::new(BlockCache::new(1 << 20, 16 * KIB).unwrap());
        let (b, reads) = blob(&cache, "blobs/a", 100_000, 0);
        assert_eq!(read(&b, 5000, 3000), expect(5000, 3000));
        assert_eq!(reads.lock().unwrap().as_slice(), &[(0, 16384)]);
        // Same block again, and another range inside it: no new fetch.
        assert_eq!(read(&b, 5000, 3000), expect(5000, 3000));
        assert_eq!(read(&b, 0, 16384), expect(0, 16384));
        assert_eq!(reads.lock().unwrap().len(), 1);
        // The short last block (100000 = 6 * 16384 + 1696).
        assert_eq!(read(&b, 99_000, 1000), expect(99_000, 1000));
        assert_eq!(reads.lock().unwrap()[1], (98_304, 1696));
        assert_eq!(read(&b, 99_999, 1), expect(99_999, 1));
        let s = cache.stats();
        assert_eq!((s.miss_blocks, s.hit_blocks, s.fetches), (2, 3, 2));
        assert_eq!(s.held_bytes, 16384 + 1696);
        // Out of range is the reader's error, and nothing is cached for it.
        assert!(b.read_at(99_999, &mut [0u8; 2]).is_err());
        // Another blob's blocks are separate even at the same offsets.
        let (b2, reads2) = blob(&cache, "blobs/b", 100_000, 0);
        read(&b2, 5000, 10);
        assert_eq!(reads2.lock().unwrap().len(), 1);
    }

    #[test]
    fn adjacent_missing_blocks_coalesce_into_one_read() {
        let cache = Arc::new(BlockCache::new(1 << 20, 16 * KIB).unwrap());
        let (b, reads) = blob(&cache, "blobs/a", 200_000, 0);
        // Spans blocks 1..=4: one fetch of four blocks.
        assert_eq!(read(&b, 20_000, 50_000), expect(20_000, 50_000));
        assert_eq!(reads.lock().unwrap().as_slice(), &[(16384, 4 * 16384)]);
        // Blocks 0..=6 with 1..=4 cached: two runs, {0} and {5, 6}, one read each.
        assert_eq!(read(&b, 0, 7 * 16384), expect(0, 7 * 16384));
        let mut r = reads.lock().unwrap()[1..].to_vec();
        r.sort();
        assert_eq!(r, vec![(0, 16384), (5 * 16384, 2 * 16384)]);
        assert_eq!(cache.stats().fetches, 3);
    }

    #[test]
    fn long_runs_are_split_into_bounded_parallel_reads() {
        let bs = 256 * KIB;
        let cache = Arc::new(BlockCache::new(256 << 20, bs).unwrap());
        let size = 40 << 20;
        let (b, reads) = blob(&cache, "blobs/a", size, 0);
        assert_eq!(read(&b, 1, size - 2), expect(1, size - 2));
        let mut r = reads.lock().unwrap().clone();
        r.sort();
        assert_eq!(r.len(), 5, "{r:?}");
        assert!(r.iter().all(|&(_, n)| n as u64 <= FETCH_BYTES_MAX));
        assert_eq!(r.iter().map(|x| x.1).sum::<usize>(), size);
    }

    #[test]
    fn eviction_keeps_the_byte_bound_and_spares_blocks_read_since_the_last_pass() {
        let bs = 16 * KIB;
        let cache = Arc::new(BlockCache::new(4 * bs, bs).unwrap());
        let (b, reads) = blob(&cache, "blobs/a", 10 * bs as usize, 0);
        // Whole blocks: a read that ends inside a block gives it a second chance.
        for i in 0..4 {
            read(&b, i * bs, bs as usize);
        }
        assert_eq!(cache.stats().held_bytes, 4 * bs);
        read(&b, 0, 1); // block 0 is now the most recently used
        read(&b, 4 * bs, bs as usize); // the hand spares block 0 (read since), evicts block 1
        let s = cache.stats();
        assert_eq!((s.held_bytes, s.evicted_blocks), (4 * bs, 1));
        let before = reads.lock().unwrap().len();
        read(&b, 0, 1);
        assert_eq!(
            reads.lock().unwrap().len(),
            before,
            "block 0 should still be cached"
        );
        read(&b, bs, bs as usize);
        assert_eq!(
            reads.lock().unwrap().len(),
            before + 1,
            "block 1 was evicted"
        );
        // Many blocks later the bound still holds.
        for i in 0..10 {
            read(&b, i * bs + 5, 100);
            assert!(cache.stats().held_bytes <= 4 * bs);
        }
    }

    #[test]
    fn a_hot_block_does_not_keep_its_whole_fetch_buffer() {
        let bs = 16 * KIB;
        let cache = Arc::new(no_readahead(16 * bs, bs));
        let (b, reads) = blob(&cache, "blobs/a", 1700 * bs as usize, 0);
        // One GET of 8 blocks: the cache counts its 128 KiB buffer.
        read(&b, 0, 8 * bs as usize);
        assert_eq!(cache.stats().held_bytes, 8 * bs);
        // Block 0 stays hot while single blocks far apart (no readahead) push the others out.
        for i in 1..=40u64 {
            assert_eq!(read(&b, 5, 10), expect(5, 10));
            read(&b, i * 41 * bs, 1);
            assert!(cache.stats().held_bytes <= 16 * bs, "{:?}", cache.stats());
        }
        // Block 0 was never fetched again, and it no longer holds the 8-block buffer: every
        // cached block now owns exactly its bytes.
        assert_eq!(reads.lock().unwrap()[0], (0, 8 * bs as usize));
        assert!(!reads.lock().unwrap()[1..].iter().any(|&(o, _)| o == 0));
        let st = cache.state.read().unwrap();
        let ready: u64 = st
            .map
            .values()
            .map(|s| match s {
                Slot::Ready(r) => {
                    assert_eq!(
                        r.data.run.bytes.len(),
                        r.data.len(),
                        "a block shares a buffer"
                    );
                    r.data.len() as u64
                }
                Slot::Loading(_) => 0,
            })
            .sum();
        assert_eq!(ready, st.held_bytes);
        let ready_blocks = st
            .map
            .values()
            .filter(|s| matches!(s, Slot::Ready(_)))
            .count();
        assert_eq!(
            live_ring_entries(&st),
            ready_blocks,
            "the clock ring lists each ready block once"
        );
        assert_eq!(st.held_bytes, 16 * bs);
        drop(st);
        assert!(cache.stats().copied_blocks >= 1, "{:?}", cache.stats());
    }

    #[test]
    fn a_scanned_fetch_buffer_goes_whole_without_copies() {
        let bs = 16 * KIB;
        let cache = Arc::new(no_readahead(16 * bs, bs));
        let (b, _) = blob(&cache, "blobs/s", 1700 * bs as usize, 0);
        read(&b, 0, 8 * bs as usize); // one GET, every block read once
        for i in 1..=20u64 {
            read(&b, i * 41 * bs, 1);
        }
        let st = cache.state.read().unwrap();
        for index in 0..8 {
            let k = BlockKey { blob: 0, index };
            assert!(
                !st.map.contains_key(&k),
                "block {index} of the scanned run was kept"
            );
        }
        let ready = st.map.values().filter(|s| matches!(s, Slot::Ready(_)));
        assert_eq!(live_ring_entries(&st), ready.count());
        assert!(st.held_bytes <= 16 * bs);
        drop(st);
        assert_eq!(cache.stats().copied_blocks, 0, "{:?}", cache.stats());
    }

    #[test]
    fn reads_larger_than_half_the_cache_bypass_it() {
        let bs = 16 * KIB;
        let cache = Arc::new(BlockCache::new(4 * bs, bs).unwrap());
        let (b, reads) = blob(&cache, "blobs/a", 10 * bs as usize, 0);
        assert_eq!(read(&b, 100, 3 * bs as usize), expect(100, 3 * bs as usize));
        assert_eq!(reads.lock().unwrap().as_slice(), &[(100, 3 * bs as usize)]);
        let s = cache.stats();
        assert_eq!((s.bypass_reads, s.held_bytes), (1, 0));
        // A disabled cache passes everything through.
        let off = Arc::new(BlockCache::new(0, bs).unwrap());
        let (b, reads) = blob(&off, "blobs/a", 10 * bs as usize, 0);
        read(&b, 7, 5);
        read(&b, 7, 5);
        assert_eq!(reads.lock().unwrap().as_slice(), &[(7, 5), (7, 5)]);
    }

    #[test]
    fn concurrent_misses_of_one_block_fetch_it_once() {
        let cache = Arc::new(BlockCache::new(1 << 20, 16 * KIB).unwrap());
        // The fetch takes 200 ms, so the second reader arrives while it is in flight.
        let (b, reads) = blob(&cache, "blobs/a", 100_000, 200);
        let b = Arc::new(b);
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = [(100u64, 50usize), (8000, 4000)]
            .into_iter()
            .map(|(off, len)| {
                let (b, barrier) = (b.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    read(&b, off, len) == expect(off, len)
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap());
        }
        assert_eq!(reads.lock().unwrap().as_slice(), &[(0, 16384)]);
        let s = cache.stats();
        assert_eq!((s.fetches, s.miss_blocks, s.joined_blocks), (1, 1, 1));
    }

    #[test]
    fn a_failed_fetch_fails_its_waiters_and_is_not_cached() {
        let cache = Arc::new(BlockCache::new(1 << 20, 16 * KIB).unwrap());
        let reads = Reads::default();
        let fail = Arc::new(AtomicBool::new(true));
        let inner = Counting {
            data: vec![9; 50_000],
            reads: reads.clone(),
            delay: Duration::from_millis(200),
            fail: fail.clone(),
        };
        let b = Arc::new(cache.wrap("blobs/f", Box::new(inner)));
        let b2 = b.clone();
        let t =
            std::thread::spawn(move || b2.read_at(0, &mut [0u8; 10]).map_err(|e| e.to_string()));
        std::thread::sleep(Duration::from_millis(50));
        let mine = b.read_at(10, &mut [0u8; 10]);
        let theirs = t.join().unwrap();
        assert!(mine.unwrap_err().to_string().contains("injected"));
        assert!(theirs.unwrap_err().contains("injected"));
        assert_eq!(
            reads.lock().unwrap().len(),
            1,
            "the waiter must not fetch again"
        );
        // The failure is not remembered: the next read fetches and succeeds.
        fail.store(false, Ordering::SeqCst);
        let mut buf = [0u8; 10];
        b.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [9; 10]);
        assert_eq!(cache.stats().held_bytes, 16384);
    }

    #[test]
    fn sequential_readers_get_readahead_and_random_ones_do_not() {
        let bs = 64 * KIB;
        // 128 MiB cache: a 32 MiB readahead budget, a window of up to 16 MiB per stream.
        let cache = Arc::new(BlockCache::new(128 << 20, bs).unwrap());
        let size = 48 << 20;
        let (b, reads) = blob(&cache, "blobs/seq", size, 0);
        let step = 48 * KIB as usize; // unaligned to blocks, like layer data reads
        let mut off = 0;
        while off + step <= size {
            assert_eq!(read(&b, off as u64, step), expect(off as u64, step));
            off += step;
        }
        let r = reads.lock().unwrap().clone();
        let blocks = (size as u64).div_ceil(bs);
        // The first reads fetch for themselves; after that the window grows (doubling per
        // window read) to 8 MiB GETs. Every byte is fetched once, and none is wasted.
        assert!(
            r.len() <= 20,
            "{} reads for {blocks} blocks: {r:?}",
            r.len()
        );
        assert!(r.iter().all(|&(_, n)| n as u64 <= FETCH_BYTES_MAX), "{r:?}");
        assert!(r[r.len() - 3..].iter().all(|&(_, n)| n >= 4 << 20), "{r:?}");
        let s = cache.stats();
        assert!(s.readahead_blocks >= blocks - 4, "{s:?}");
        assert_eq!(s.fetched_bytes, size as u64, "{s:?}");
        assert_eq!((s.refetched_blocks, s.readahead_wasted_blocks), (0, 0));
        // Two interleaved streams (a copy over two connections) both get readahead.
        let (b, reads) = blob(&cache, "blobs/two", size, 0);
        let half = size / 2;
        let mut off = 0;
        while off + step <= half {
            for base in [0, half] {
                let at = (base + off) as u64;
                assert_eq!(read(&b, at, step), expect(at, step));
            }
            off += step;
        }
        let n = reads.lock().unwrap().len();
        assert!(n <= 40, "{n} reads for two streams");
        // Random reads far apart never look sequential.
        let (b, reads) = blob(&cache, "blobs/rnd", size, 0);
        for i in 0..40u64 {
            let at = (i * 7_777_777) % (size as u64 - 10);
            read(&b, at, 10);
        }
        let r = reads.lock().unwrap().clone();
        assert!(r.iter().all(|&(_, n)| n as u64 == bs), "{r:?}");
    }

    #[test]
    fn a_failed_readahead_is_fetched_again_by_its_waiting_reader() {
        let bs = 16 * KIB;
        let cache = Arc::new(BlockCache::new(1 << 20, bs).unwrap());
        let (b, reads) = blob(&cache, "blobs/ra", 100_000, 0);
        // A readahead of block 2 is in flight and will fail in 200 ms.
        let f = Flight::new(Some(window(4)));
        let k = b.shared.key(2);
        let mut st = cache.state.write().unwrap();
        st.map.insert(k, Slot::Loading(f.clone()));
        drop(st);
        let c2 = cache.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c2.state.write().unwrap().map.remove(&k);
            f.finish(Err(Error::Unavailable {
                key: "k".into(),
                message: "injected".into(),
            }));
        });
        // The reader waits for it, sees it fail, and fetches the block itself.
        assert_eq!(read(&b, 2 * bs + 5, 10), expect(2 * bs + 5, 10));
        t.join().unwrap();
        assert_eq!(reads.lock().unwrap().as_slice(), &[(2 * bs, bs as usize)]);
        assert_eq!(cache.stats().joined_blocks, 1);
        // A reader's own failed fetch is not retried by the readers waiting for it (see
        // a_failed_fetch_fails_its_waiters_and_is_not_cached).
    }

    #[test]
    fn fetch_buffers_are_recycled_within_a_bound() {
        // A size no other test uses (the pool is shared by every cache in the process).
        let len = (3 << 20) + 5 * 4096;
        let given = vec![7u8; len];
        let at = given.as_ptr();
        // Room for it (other tests' fetches fill the pool with segments).
        BUFFERS.lock().unwrap().clear();
        give_buffer(given);
        // Only a buffer of exactly the length asked for is handed out again.
        let other = take_buffer(len + 4096);
        assert_ne!(other.as_ptr(), at);
        let again = take_buffer(len);
        assert_eq!(
            (again.as_ptr(), again.len(), again.capacity()),
            (at, len, len)
        );
        // The pool keeps at most POOL_BYTES_MAX bytes, and nothing small.
        for _ in 0..(POOL_BYTES_MAX / len + 4) {
            give_buffer(vec![7u8; len]);
        }
        give_buffer(vec![0u8; 1000]);
        let pool = BUFFERS.lock().unwrap();
        assert!(pool.iter().map(Vec::capacity).sum::<usize>() <= POOL_BYTES_MAX);
        assert!(pool.iter().all(|b| b.capacity() >= POOL_BUFFER_BYTES_MIN));
    }

    /// A fetch longer than a segment is still one read of the source, but lands in
    /// segment-sized buffers (which any later fetch can reuse) and is counted as such:
    /// a block is never split across two, and the prefetch admission to the disk tier
    /// looks at the fetch's length, not the segment's.
    #[test]
    fn a_long_fetch_is_one_read_into_segments() {
        let bs = 16 * KIB;
        let cache = Arc::new(no_readahead(16 << 20, bs));
        assert_eq!(cache.segment_bytes, SEGMENT_BYTES);
        let (b, reads) = blob(&cache, "blobs/seg", 5 << 20, 0);
        let (off, len) = (1000, (5 << 19) + 3000);
        assert_eq!(read(&b, off, len), expect(off, len));
        let end = (off + len as u64).div_ceil(bs) * bs;
        assert_eq!(reads.lock().unwrap().as_slice(), &[(0, end as usize)]);
        let st = cache.stats();
        assert_eq!((st.fetches, st.held_bytes), (1, end));
        let state = cache.state.read().unwrap();
        let runs: HashSet<usize> = (state.map.values())
            .map(|s| match s {
                Slot::Ready(r) => {
                    assert!(r.data.run.bytes.len() as u64 <= SEGMENT_BYTES);
                    assert_eq!(r.data.run.fetch_bytes as u64, end);
                    Arc::as_ptr(&r.data.run) as usize
                }
                Slot::Loading(_) => panic!("nothing is in flight"),
            })
            .collect();
        assert_eq!(runs.len() as u64, end.div_ceil(SEGMENT_BYTES));
        drop(state);
        // Blocks larger than a segment make segments of one block.
        let big = BlockCache::new(16 << 20, 3 << 20).unwrap();
        assert_eq!(big.segment_bytes, 3 << 20);
    }

    #[test]
    fn inserted_blocks_are_served_and_sizes_are_checked() {
        let cache = Arc::new(BlockCache::new(1 << 20, 16 * KIB).unwrap());
        let (b, reads) = blob(&cache, "blobs/a", 100_000, 0);
        cache.insert("blobs/a", 0, expect(0, 16384));
        assert_eq!(read(&b, 10, 100), expect(10, 100));
        assert!(reads.lock().unwrap().is_empty());
        assert!(BlockCache::new(1 << 20, 100).is_err());
        assert!(BlockCache::new(1000, 16 * KIB).is_err());
        assert!(BlockCache::new(0, 16 * KIB).is_ok());
    }

    /// Guards against the thrash the issue measured: 35 layers each read sequentially at
    /// once, each stream with its own 32 MiB of readahead in a 256 MiB cache, so prefetched
    /// blocks were evicted before they were read and fetched again (up to 10 times). Here 24
    /// blobs are read in interleaved sequential streams through a small cache: prefetched
    /// blocks not yet read never exceed the budget, nothing is fetched twice, and at most a
    /// little more is fetched than is read.
    #[test]
    fn readahead_across_many_streams_stays_within_its_budget() {
        let bs = 16 * KIB;
        let cache = Arc::new(BlockCache::new(8 << 20, bs).unwrap());
        let budget = cache.readahead_budget_blocks;
        assert_eq!(budget, 128);
        let size = 3 << 20;
        let blobs: Vec<_> = (0..24)
            .map(|i| blob(&cache, &format!("blobs/l{i}"), size, 0))
            .collect();
        let step = 20 * KIB as usize;
        let mut off = 0;
        let mut peak = 0;
        while off + step <= size {
            for (b, _) in &blobs {
                assert_eq!(read(b, off as u64, step), expect(off as u64, step));
                peak = peak.max(cache.stats().readahead_unread_blocks);
            }
            off += step;
        }
        let s = cache.stats();
        assert!(
            peak <= budget,
            "{peak} prefetched blocks unread at once: {s:?}"
        );
        assert!(s.readahead_blocks > 0, "{s:?}");
        assert_eq!(s.refetched_blocks, 0, "{s:?}");
        assert!(s.fetched_bytes <= s.read_bytes + s.read_bytes / 8, "{s:?}");
        for (_, reads) in &blobs {
            assert_no_range_fetched_twice(reads);
        }
    }

    fn assert_no_range_fetched_twice(reads: &Reads) {
        let mut r = reads.lock().unwrap().clone();
        r.sort();
        for w in r.windows(2) {
            assert!(
                w[0].0 + w[0].1 as u64 <= w[1].0,
                "a range fetched twice: {w:?}"
            );
        }
    }

    /// A prefetched block evicted before it was read was fetched for nothing: it is counted,
    /// its stream's window halves, and fetching it again counts as a refetch.
    #[test]
    fn an_unread_prefetch_evicted_lowers_its_streams_readahead() {
        let bs = 16 * KIB;
        let cache = Arc::new(BlockCache::new(4 << 20, bs).unwrap());
        let (b, reads) = blob(&cache, "blobs/seq", 4 << 20, 0);
        // A sequential stream: readahead starts and its window grows.
        for i in 0..40u64 {
            read(&b, i * bs, bs as usize);
        }
        let stream_window = || {
            let q = b.shared.seq.lock().unwrap();
            let blocks = q.iter().next().unwrap().state.blocks.load(Ordering::SeqCst);
            blocks
        };
        wait_for_readahead(&cache);
        let grown = stream_window();
        assert!(grown > cache.readahead_initial_blocks, "{grown}");
        let s0 = cache.stats();
        assert!(s0.readahead_unread_blocks > 0, "{s0:?}");
        // Another reader's blocks fill the cache before the stream reads on: the prefetched
        // blocks go unread.
        for i in 0..(8 << 20) / bs {
            cache.insert("blobs/other", i, vec![1; bs as usize]);
        }
        let s = cache.stats();
        assert!(s.readahead_wasted_blocks > 0, "{s:?}");
        assert_eq!(s.readahead_unread_blocks, 0, "{s:?}");
        assert!(stream_window() < grown, "{} !< {grown}", stream_window());
        // The stream reads on: what it wanted again is fetched again, and counted.
        let before = reads.lock().unwrap().len();
        read(&b, 40 * bs, bs as usize);
        assert!(reads.lock().unwrap().len() > before);
        assert!(cache.stats().refetched_blocks >= 1, "{:?}", cache.stats());
    }

    fn wait_for_readahead(cache: &BlockCache) {
        for _ in 0..500 {
            let st = cache.state.read().unwrap();
            if !st.map.values().any(|s| matches!(s, Slot::Loading(_))) {
                return;
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("readahead still in flight after 5 s");
    }

    /// A sequential reader whose window has grown gets whole GETs that start and end at
    /// multiples of FETCH_BYTES_MAX (a blob's short tail joins the last), whatever the size
    /// of its reads; and it fetches nothing twice.
    #[test]
    fn a_grown_streams_readahead_fetches_whole_aligned_gets() {
        let bs = 4 * KIB;
        let cache = Arc::new(BlockCache::new(256 << 20, bs).unwrap());
        let tail = 12 * KIB as usize;
        let size = (48 << 20) + tail;
        let (b, reads) = blob(&cache, "blobs/aligned", size, 0);
        // Reads of 96 KiB do not divide 8 MiB: unaligned windows unless readahead aligns.
        let step = 96 * KIB as usize;
        let mut off = 0;
        while off < size {
            let n = step.min(size - off);
            assert_eq!(read(&b, off as u64, n), expect(off as u64, n));
            off += n;
        }
        wait_for_readahead(&cache);
        assert_no_range_fetched_twice(&reads);
        let mut r = reads.lock().unwrap().clone();
        r.sort();
        let fetch = FETCH_BYTES_MAX as usize;
        // Past the first GET boundary every GET is one whole aligned GET (the last one with
        // the tail).
        let late: Vec<_> = r.iter().filter(|(o, _)| *o >= FETCH_BYTES_MAX).collect();
        assert!(!late.is_empty(), "{r:?}");
        for &&(o, len) in &late {
            assert!(
                o.is_multiple_of(FETCH_BYTES_MAX),
                "unaligned GET at {o}: {r:?}"
            );
            let whole = if o as usize + fetch + tail == size {
                fetch + tail
            } else {
                fetch
            };
            assert_eq!(len, whole, "a GET of {len} at {o}: {r:?}");
        }
        // What the stream fetched while its window grew, before the first boundary.
        assert!(
            r.len() - late.len() <= 12,
            "{} GETs before 8 MiB: {r:?}",
            r.len() - late.len()
        );
    }

    /// `aligned_end` never ends before what was asked nor past the blob; a grown window
    /// ends on a GET boundary or at the blob's end, at most a GET (plus a short tail) further;
    /// a small one ends as asked.
    #[test]
    fn readahead_ends_where_whole_gets_end() {
        let per_fetch = 64;
        for blocks in [1, 63, 64, 65, 72, 73, 200, 1000] {
            // A run never starts on the tail.
            let tail_start = blocks / per_fetch * per_fetch;
            if blocks - tail_start <= per_fetch / TAIL_DIVISOR && tail_start > 0 {
                assert!(!run_starts_at(tail_start, per_fetch, blocks), "{blocks}");
            }
            for from in (0..blocks).step_by(3) {
                for to in from..=blocks {
                    for span in [1, 31, 32, 64, 500] {
                        let end = aligned_end(from, to, span, per_fetch, blocks);
                        let what = format!("from {from} to {to} span {span} blocks {blocks}");
                        assert!(end >= to && end <= blocks, "{end}: {what}");
                        if to == from || span.max(to - from) * 2 < per_fetch {
                            assert_eq!(end, to, "{what}");
                            continue;
                        }
                        assert!(
                            end.is_multiple_of(per_fetch) || end == blocks,
                            "{end}: {what}"
                        );
                        assert!(
                            end - to < per_fetch + per_fetch / TAIL_DIVISOR,
                            "{end}: {what}"
                        );
                        if end == blocks && !blocks.is_multiple_of(per_fetch) {
                            // Stopped short of the end only if more than a tail was left.
                            let boundary = to.next_multiple_of(per_fetch).min(blocks);
                            assert!(blocks - boundary <= per_fetch / TAIL_DIVISOR, "{what}");
                        }
                    }
                }
            }
        }
    }

    /// Eight threads read one blob as one sequential stream, out of order (as NBD requests
    /// in flight arrive): each byte is fetched exactly once, by a reader or by readahead.
    #[test]
    fn concurrent_sequential_readers_fetch_each_range_once() {
        let bs = 16 * KIB;
        let cache = Arc::new(BlockCache::new(32 << 20, bs).unwrap());
        let size = 12 << 20;
        let (b, reads) = blob(&cache, "blobs/par", size, 1);
        let b = Arc::new(b);
        let next = Arc::new(AtomicU64::new(0));
        let step = 64 * KIB;
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (b, next) = (b.clone(), next.clone());
                std::thread::spawn(move || loop {
                    let at = next.fetch_add(step, Ordering::SeqCst);
                    if at >= size as u64 {
                        return true;
                    }
                    if read(&b, at, step as usize) != expect(at, step as usize) {
                        return false;
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap());
        }
        wait_for_readahead(&cache);
        assert_no_range_fetched_twice(&reads);
        let s = cache.stats();
        assert_eq!(s.fetched_bytes, size as u64, "{s:?}");
        assert_eq!(s.refetched_blocks, 0, "{s:?}");
        assert!(s.readahead_used_blocks > 0, "{s:?}");
    }

    /// Random readers fetch about what they read: with 4 KiB blocks, a 4 KiB read at any
    /// offset fetches one or two blocks (coalesced into one GET), never a large range.
    #[test]
    fn random_page_reads_fetch_page_sized_ranges() {
        let bs = 4 * KIB;
        let cache = Arc::new(BlockCache::new(64 << 20, bs).unwrap());
        let size = 64 << 20;
        let (b, reads) = blob(&cache, "blobs/rnd", size, 0);
        let mut x = 12345u64;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = 100 + ((x >> 20) % (size as u64 / 4096 - 1)) * 4096; // page 100 bytes in
            assert_eq!(read(&b, at, 4096), expect(at, 4096));
        }
        let s = cache.stats();
        assert!(s.fetched_bytes <= 2 * s.read_bytes, "{s:?}");
        assert_eq!(s.readahead_blocks, 0, "{s:?}");
        assert!(reads.lock().unwrap().iter().all(|&(_, n)| n <= 8192));
        // Larger random reads in a region the stream detector spans (16 MiB behind, 512 KiB
        // ahead): a few land just ahead of a stream, many more far behind it, so no stream
        // builds a streak and next to nothing is read ahead.
        let small = Arc::new(BlockCache::new(4 << 20, bs).unwrap());
        let (b, _) = blob(&small, "blobs/rnd64", 16 << 20, 0);
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = ((x >> 20) % 255) * 65536;
            assert_eq!(read(&b, at, 65536), expect(at, 65536));
        }
        let s = small.stats();
        assert!(s.readahead_blocks * 100 <= s.read_bytes / bs, "{s:?}");
    }

    /// Waits until the disk tier has written `n` blocks in all.
    fn wait_for_disk_writes(cache: &BlockCache, n: u64) {
        for _ in 0..500 {
            if cache.stats().disk.written_blocks >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("disk tier wrote {:?} blocks, not {n}", cache.stats().disk);
    }

    /// Blocks evicted from memory come back from the disk tier, not from the source; a
    /// flipped byte in the cache file is detected by the block's checksum and the block is
    /// fetched from the source again: never served.
    #[test]
    fn the_disk_tier_serves_evicted_blocks_and_never_a_corrupt_one() {
        let bs = 4 * KIB;
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path(), 64 * bs, bs).unwrap();
        let cache = Arc::new(no_readahead(8 * bs, bs).with_disk(disk).unwrap());
        let (b, reads) = blob(&cache, "blobs/d", 32 * bs as usize, 0);
        // Blocks 0..=3, one GET; written to the disk tier as one run.
        assert_eq!(read(&b, 0, 4 * bs as usize), expect(0, 4 * bs as usize));
        wait_for_disk_writes(&cache, 4);
        // Push them out of memory.
        for i in 0..16 {
            cache.insert("blobs/other", i, vec![1; bs as usize]);
        }
        assert!(!cache
            .state
            .read()
            .unwrap()
            .map
            .contains_key(&b.shared.key(0)));
        let fetched = reads.lock().unwrap().len();
        assert_eq!(read(&b, 100, 3 * bs as usize), expect(100, 3 * bs as usize));
        assert_eq!(
            reads.lock().unwrap().len(),
            fetched,
            "served from the disk tier"
        );
        assert_eq!(cache.stats().disk.hit_blocks, 4);
        // Out of memory again; then one byte of block 2 flips on the disk.
        for i in 16..32 {
            cache.insert("blobs/other", i, vec![1; bs as usize]);
        }
        let path = dir.path().join(super::super::disk_cache::BLOCKS_FILE);
        let mut raw = std::fs::read(&path).unwrap();
        raw[2 * bs as usize + 1234] ^= 0x01; // slot 2 holds block 2 (written first)
        std::fs::write(&path, &raw).unwrap();
        assert_eq!(read(&b, 2 * bs, bs as usize), expect(2 * bs, bs as usize));
        let r = reads.lock().unwrap().clone();
        assert_eq!(r.len(), fetched + 1, "{r:?}");
        assert_eq!(
            r[fetched],
            (2 * bs, bs as usize),
            "block 2 fetched from the source"
        );
        let s = cache.stats();
        assert_eq!(s.disk.corrupt_blocks, 1, "{s:?}");
        // Blocks 0, 1 and 3 were intact: still served from the disk.
        assert_eq!(read(&b, 0, 2 * bs as usize), expect(0, 2 * bs as usize));
        assert_eq!(read(&b, 3 * bs, 10), expect(3 * bs, 10));
        assert_eq!(reads.lock().unwrap().len(), fetched + 1);
        assert!(BlockCache::new(1 << 20, 8 * KIB)
            .unwrap()
            .with_disk(DiskCache::open(&dir.path().join("other"), 1 << 20, bs).unwrap())
            .is_err());
    }

    /// Prefetched blocks reach the disk tier once a reader reads them; those nobody read
    /// stay off it (readahead must not push a reader's working set off the disk).
    #[test]
    fn prefetched_blocks_reach_the_disk_tier_only_when_read() {
        let bs = 16 * KIB;
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path(), 8 << 20, bs).unwrap();
        let cache = Arc::new(
            BlockCache::new(8 << 20, bs)
                .unwrap()
                .with_disk(disk)
                .unwrap(),
        );
        let (b, _) = blob(&cache, "blobs/ra", 4 << 20, 0);
        for i in 0..64u64 {
            assert_eq!(read(&b, i * bs, bs as usize), expect(i * bs, bs as usize));
        }
        wait_for_readahead(&cache);
        let s = cache.stats();
        assert!(s.readahead_used_blocks > 0, "{s:?}");
        assert!(
            s.fetched_bytes / bs > 64,
            "readahead went past the reads: {s:?}"
        );
        wait_for_disk_writes(&cache, 64);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(cache.stats().disk.written_blocks, 64, "{:?}", cache.stats());
    }
}
