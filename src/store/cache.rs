//! A bounded in-memory block cache for immutable blobs read from a remote image store.
//!
//! Layer blobs never change once written, so cached bytes never go stale and nothing is ever
//! invalidated. A blob opened through [`BlockCache::wrap`] is read in blocks of
//! `block_bytes`, keyed by (blob key, block index):
//!
//! - **hits** are copied out of memory;
//! - **misses** are fetched block-aligned from the underlying [`BlobReader`], and adjacent
//!   missing blocks of one read are **coalesced** into one ranged read (one GET on S3) of at
//!   most [`FETCH_BYTES_MAX`]; longer runs are split and fetched in parallel;
//! - **single flight**: a block being fetched is marked in the map; a second reader that
//!   wants it waits for that fetch instead of starting its own;
//! - **bounded** (CLOCK, an LRU approximation): ready blocks sit on a ring; a read sets a
//!   block's reference bit (under the read lock only, so warm hits never contend for an
//!   exclusive lock); when the buffers held exceed `capacity_bytes` the hand passes over the
//!   ring, clearing set bits and evicting the first block whose bit was clear. Blocks cut
//!   from one GET share its buffer, which counts whole while any of them is cached; once
//!   fewer than half remain, the hot ones are copied out and the rest evicted, so that the
//!   buffer can go. Blocks being fetched, and blocks a reader is still copying out of, are
//!   not counted (they are transient, bounded by the reads in flight);
//! - **readahead**: reads that continue a sequential stream (up to [`STREAMS_MAX`] per blob)
//!   keep the next [`READAHEAD_BYTES`] (at most a quarter of the cache) being fetched in the
//!   background, in GETs of [`FETCH_BYTES_MAX`].
//!
//! Reads that would need more blocks than half the cache bypass it (a full scan of a large
//! layer must not evict everything), as does every read when `capacity_bytes` is 0.

use super::{BlobReader, Error, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// Longest single ranged read the cache issues. A longer run of missing blocks is split into
/// reads of this size, fetched in parallel (a single stream rarely fills a link to S3).
pub const FETCH_BYTES_MAX: u64 = 8 << 20;

/// Most parallel reads one cache read issues for a long run of missing blocks.
pub const FETCH_PARALLEL_MAX: usize = 8;

/// How far ahead of a sequential reader blocks are fetched (at most a quarter of the cache).
/// Fetched as runs of up to [`FETCH_BYTES_MAX`], several at once, in the background.
pub const READAHEAD_BYTES: u64 = 32 << 20;

/// Threads per cache that run readahead fetches (each one ranged GET at a time).
pub const READAHEAD_THREADS: usize = 4;

/// A read continues a sequential stream if it starts within this many blocks of the furthest
/// block the stream read (either side: concurrent readers of one stream arrive out of order).
pub const SEQUENTIAL_SLACK_BLOCKS: u64 = 32;

/// Reads that moved a stream forward before readahead starts for it.
pub const SEQUENTIAL_READS_MIN: u32 = 3;

/// A block read this often is hot: kept (copied out) when the rest of its fetch buffer goes.
/// A sequential scan reads each block once or twice (reads straddle block boundaries).
pub const HOT_READS: u32 = 3;

/// Sequential streams tracked per blob.
pub const STREAMS_MAX: usize = 4;

/// Smallest block size accepted: smaller blocks cost more requests than they save bytes.
pub const BLOCK_BYTES_MIN: u64 = 4 << 10;

/// Largest block size accepted (one block is one allocation).
pub const BLOCK_BYTES_MAX: u64 = 64 << 20;

/// Counters, for tests, logs and the benchmark. All counts are cumulative.
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
    /// Blocks dropped to stay within the byte bound.
    pub evicted_blocks: u64,
    /// Reads that bypassed the cache (too large, or the cache is disabled).
    pub bypass_reads: u64,
    /// Blocks fetched ahead of sequential readers.
    pub readahead_blocks: u64,
    /// Hot blocks copied out of a mostly evicted fetch buffer.
    pub copied_blocks: u64,
    /// Bytes of ready blocks held now.
    pub held_bytes: u64,
}

/// A block: the blob's number (interned from its key) and the block's index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct BlockKey {
    blob: u64,
    index: u64,
}

/// A fetch in progress, shared by every reader waiting for its block.
struct Flight {
    result: Mutex<Option<std::result::Result<Block, Error>>>,
    done: Condvar,
    /// Started by readahead, not by a reader: should it fail, waiters fetch for themselves.
    prefetch: bool,
}

impl Flight {
    fn new(prefetch: bool) -> Arc<Flight> {
        Arc::new(Flight {
            result: Mutex::new(None),
            done: Condvar::new(),
            prefetch,
        })
    }

    fn finish(&self, r: std::result::Result<Block, Error>) {
        *self.result.lock().unwrap() = Some(r);
        self.done.notify_all();
    }

    fn wait(&self) -> Result<Block> {
        let mut g = self.result.lock().unwrap();
        loop {
            if let Some(r) = g.as_ref() {
                return match r {
                    Ok(b) => Ok(b.clone()),
                    Err(e) => Err(clone_error(e)),
                };
            }
            g = self.done.wait(g).unwrap();
        }
    }
}

enum Slot {
    /// `referenced`: read since the clock hand last passed; `reads`: times read. Both are
    /// updated under the read lock.
    Ready {
        data: Block,
        referenced: AtomicBool,
        reads: AtomicU32,
    },
    Loading(Arc<Flight>),
}

#[derive(Default)]
struct State {
    map: HashMap<BlockKey, Slot>,
    /// The CLOCK: every ready block once, in the order the hand visits them (front first).
    ring: VecDeque<BlockKey>,
    held_bytes: u64,
}

#[derive(Default)]
struct Counters {
    hit_blocks: AtomicU64,
    miss_blocks: AtomicU64,
    joined_blocks: AtomicU64,
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
    evicted_blocks: AtomicU64,
    bypass_reads: AtomicU64,
    readahead_blocks: AtomicU64,
    copied_blocks: AtomicU64,
}

/// A blob's number in block keys, and its size once opened.
type BlobId = (u64, Option<u64>);

/// The cache. Share it (`Arc`) between every blob of a store: the byte bound is global.
pub struct BlockCache {
    capacity_bytes: u64,
    block_bytes: u64,
    /// Blocks fetched ahead of a sequential reader (0: no readahead).
    readahead_blocks: u64,
    /// Hits take the read lock; misses, fills and evictions the write lock.
    state: RwLock<State>,
    /// Blob keys → the numbers block keys use, and the blob's size once opened.
    ids: Mutex<HashMap<Arc<str>, BlobId>>,
    counters: Counters,
    /// Runs the readahead fetches.
    pool: Mutex<threadpool::ThreadPool>,
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
        // Readahead may use a quarter of the cache; less than two blocks is not worth it.
        let readahead = (READAHEAD_BYTES.min(capacity_bytes / 4) / block_bytes).max(1);
        Ok(BlockCache {
            capacity_bytes,
            block_bytes,
            readahead_blocks: if readahead >= 2 { readahead } else { 0 },
            state: RwLock::new(State::default()),
            ids: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            pool: Mutex::new(
                threadpool::Builder::new()
                    .num_threads(READAHEAD_THREADS)
                    .thread_name("readahead".into())
                    .build(),
            ),
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
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
            evicted_blocks: get(&c.evicted_blocks),
            bypass_reads: get(&c.bypass_reads),
            readahead_blocks: get(&c.readahead_blocks),
            copied_blocks: get(&c.copied_blocks),
            held_bytes: self.state.read().unwrap().held_bytes,
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
                seq: Mutex::new(Sequence::default()),
            }),
        }
    }

    /// Puts a block that was fetched some other way (e.g. with the request that learned the
    /// blob's size). `data` must be the whole block (shorter only for the blob's last block;
    /// anything past one block is ignored).
    /// Ignored if the block is already present or being fetched.
    pub fn insert(&self, key: &str, index: u64, data: Vec<u8>) {
        if self.capacity_bytes == 0 || data.is_empty() {
            return;
        }
        let k = BlockKey {
            blob: self.id(key),
            index,
        };
        let mut st = self.state.write().unwrap();
        if st.map.contains_key(&k) {
            return;
        }
        let bs = self.block_bytes as usize;
        let mut data = data;
        data.truncate(bs);
        let block = Block::cut(k.blob, index, data, bs).swap_remove(0);
        self.put_ready(&mut st, k, block);
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
        (size == 0 || matches!(st.map.get(&first), Some(Slot::Ready { .. }))).then_some(size)
    }

    /// Inserts (or replaces) a ready block and evicts down to the bound: the CLOCK hand
    /// passes over the ring, giving blocks read since its last pass a second chance and
    /// evicting the first one that was not.
    fn put_ready(&self, st: &mut State, k: BlockKey, data: Block) {
        hold(st, &data);
        let slot = Slot::Ready {
            data,
            referenced: AtomicBool::new(false),
            reads: AtomicU32::new(0),
        };
        match st.map.insert(k, slot) {
            // Fetched twice (a reader refetching after a failed readahead raced another):
            // the key is on the ring already.
            Some(Slot::Ready { data: old, .. }) => {
                let n = release(st, &old, &self.counters);
                self.counters.evicted_blocks.fetch_add(n, Ordering::Relaxed);
            }
            _ => st.ring.push_back(k),
        }
        // Each pass clears the bits it skips, so two passes over the ring always evict.
        let mut budget = 2 * st.ring.len() + 1;
        while st.held_bytes > self.capacity_bytes && budget > 0 {
            budget -= 1;
            let Some(victim) = st.ring.pop_front() else {
                break;
            };
            match st.map.get(&victim) {
                Some(Slot::Ready { referenced, .. })
                    if referenced.swap(false, Ordering::Relaxed) =>
                {
                    st.ring.push_back(victim);
                }
                Some(Slot::Ready { .. }) => {
                    if let Some(Slot::Ready { data, .. }) = st.map.remove(&victim) {
                        let n = 1 + release(st, &data, &self.counters);
                        self.counters.evicted_blocks.fetch_add(n, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Counts a block entering the cache (its buffer's capacity, if it is the buffer's first).
fn hold(st: &mut State, b: &Block) {
    if b.run.cached.fetch_add(1, Ordering::Relaxed) == 0 {
        st.held_bytes += b.run.bytes.capacity() as u64;
    }
}

/// Counts a block leaving the cache. When fewer than half of its buffer's blocks remain, the
/// hot ones (read since the clock hand last passed, or [`HOT_READS`] times) are copied into
/// buffers of their own and the others are evicted with it (after a scan they are next
/// anyway), so the big buffer can be freed. Returns how many blocks that evicted.
fn release(st: &mut State, b: &Block, counters: &Counters) -> u64 {
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
        let Some(Slot::Ready {
            data,
            referenced,
            reads,
        }) = st.map.get_mut(&k)
        else {
            continue;
        };
        if !Arc::ptr_eq(&data.run, run) {
            continue;
        }
        let hot = referenced.load(Ordering::Relaxed) || reads.load(Ordering::Relaxed) >= HOT_READS;
        if !hot {
            cold.push(k);
            continue;
        }
        let copy = Block::cut(run.blob, index, data.bytes().to_vec(), data.len()).swap_remove(0);
        copy.run.cached.store(1, Ordering::Relaxed);
        st.held_bytes += copy.len() as u64;
        *data = copy;
        counters.copied_blocks.fetch_add(1, Ordering::Relaxed);
        if run.cached.fetch_sub(1, Ordering::Relaxed) == 1 {
            st.held_bytes -= run.bytes.capacity() as u64;
        }
    }
    for k in &cold {
        st.map.remove(k);
        if run.cached.fetch_sub(1, Ordering::Relaxed) == 1 {
            st.held_bytes -= run.bytes.capacity() as u64;
        }
    }
    if !cold.is_empty() {
        st.ring.retain(|k| !cold.contains(k));
    }
    cold.len() as u64
}

/// The buffer one fetch filled, shared by the blocks cut from it.
struct Run {
    bytes: Vec<u8>,
    /// The blob and first block of the run, to find its blocks again.
    blob: u64,
    first: u64,
    blocks: u64,
    /// Blocks of this run in the cache. Changed only under the state lock.
    cached: AtomicU64,
}

impl Drop for Run {
    fn drop(&mut self) {
        give_buffer(std::mem::take(&mut self.bytes));
    }
}

/// Fetch buffers no longer used by any block, for the next fetches: a fresh multi-megabyte
/// buffer costs a page fault per 4 KiB and zeroing; a recycled one neither. Bounded by
/// [`POOL_BUFFERS_MAX`] buffers (extra memory beyond the cache's bound).
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Most buffers kept for reuse (a sequential stream uses about as many as readahead threads).
pub const POOL_BUFFERS_MAX: usize = 6;

/// Buffers smaller than this are not worth keeping.
pub const POOL_BUFFER_BYTES_MIN: usize = 1 << 20;

/// A buffer of `len` bytes for a fetch (contents unspecified): recycled when one fits (at
/// most a quarter larger), else new.
pub fn take_buffer(len: usize) -> Vec<u8> {
    if len >= POOL_BUFFER_BYTES_MIN {
        let mut pool = BUFFERS.lock().unwrap();
        // A buffer much larger than needed would be counted whole against the cache bound.
        let fits = (pool.iter().enumerate())
            .filter(|(_, b)| b.capacity() >= len && b.capacity() <= len + len / 4);
        if let Some(i) = fits.min_by_key(|(_, b)| b.capacity()).map(|(i, _)| i) {
            let mut b = pool.swap_remove(i);
            drop(pool);
            // Only bytes never initialized are zeroed (none, for same-sized fetches).
            b.resize(len, 0);
            return b;
        }
    }
    vec![0; len]
}

fn give_buffer(b: Vec<u8>) {
    if b.capacity() >= POOL_BUFFER_BYTES_MIN {
        let mut pool = BUFFERS.lock().unwrap();
        if pool.len() < POOL_BUFFERS_MAX {
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
        let run = Arc::new(Run {
            blob,
            first,
            blocks: len.div_ceil(block_bytes) as u64,
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
/// a store that receives bytes into a buffer of its own (S3) implements this to hand that
/// buffer over instead of copying it.
pub trait Source: Send + Sync {
    /// `len` bytes at `offset` (inside the blob), in a buffer of exactly that length
    /// (ideally from [`take_buffer`]; the cache recycles it when its blocks are gone).
    fn fetch(&self, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// [`BlobReader::read_at`], for reads that bypass the cache.
    fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn size_bytes(&self) -> u64;
}

struct ReaderSource(Box<dyn BlobReader>);

impl Source for ReaderSource {
    fn fetch(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = take_buffer(len);
        self.0.read_at(offset, &mut buf)?;
        Ok(buf)
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
    seq: Mutex<Sequence>,
}

/// Sequential-access detection of one blob: a few streams (an NBD client copying an image
/// with several connections reads several regions at once), each with its frontier.
#[derive(Default)]
struct Sequence {
    streams: Vec<Stream>,
    clock: u64,
}

struct Stream {
    /// Furthest block read so far by this stream.
    frontier: u64,
    /// Reads that moved the frontier forward, in a row.
    streak: u32,
    /// `Sequence::clock` at the last read: the least recently used stream is replaced.
    used: u64,
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
            let Some(Slot::Ready {
                data,
                referenced,
                reads,
            }) = st.map.get(&self.key(index))
            else {
                return None;
            };
            referenced.store(true, Ordering::Relaxed);
            reads.fetch_add(1, Ordering::Relaxed);
            plans.push(Plan::Have(data.clone()));
        }
        c.counters
            .hit_blocks
            .fetch_add(plans.len() as u64, Ordering::Relaxed);
        Some(plans)
    }

    /// Decides, under the write lock, which blocks are present, awaited or ours to fetch.
    fn plan(&self, first: u64, last: u64) -> Vec<Plan> {
        if let Some(p) = self.hits(first, last) {
            return p;
        }
        let c = &self.cache;
        let mut st = c.state.write().unwrap();
        let mut plans = Vec::with_capacity((last - first + 1) as usize);
        for index in first..=last {
            let k = self.key(index);
            let plan = match st.map.get(&k) {
                Some(Slot::Ready {
                    data,
                    referenced,
                    reads,
                }) => {
                    referenced.store(true, Ordering::Relaxed);
                    reads.fetch_add(1, Ordering::Relaxed);
                    c.counters.hit_blocks.fetch_add(1, Ordering::Relaxed);
                    Plan::Have(data.clone())
                }
                Some(Slot::Loading(f)) => {
                    c.counters.joined_blocks.fetch_add(1, Ordering::Relaxed);
                    Plan::Wait(f.clone())
                }
                None => {
                    let f = Flight::new(false);
                    st.map.insert(k, Slot::Loading(f.clone()));
                    c.counters.miss_blocks.fetch_add(1, Ordering::Relaxed);
                    Plan::Fetch(f)
                }
            };
            plans.push(plan);
        }
        plans
    }

    /// Fetches blocks `[start, start + n)` with one read and publishes them (or the error)
    /// to the cache and to every reader waiting for them.
    fn fetch_run(&self, start: u64, flights: &[Arc<Flight>]) -> Result<Blocks> {
        let bs = self.cache.block_bytes;
        let n = flights.len() as u64;
        let end = ((start + n) * bs).min(self.inner.size_bytes());
        let len = (end - start * bs) as usize;
        let c = &self.cache.counters;
        c.fetches.fetch_add(1, Ordering::Relaxed);
        let r = self.inner.fetch(start * bs, len).and_then(|buf| {
            if buf.len() == len {
                Ok(buf)
            } else {
                Err(Error::Remote {
                    key: self.key.to_string(),
                    message: format!("asked for {len} bytes, got {}", buf.len()),
                })
            }
        });
        let mut st = self.cache.state.write().unwrap();
        let keys = (start..start + n).map(|index| self.key(index));
        match r {
            Ok(bytes) => {
                c.fetched_bytes.fetch_add(len as u64, Ordering::Relaxed);
                let blocks = Block::cut(self.id, start, bytes, bs as usize);
                for ((k, f), data) in keys.zip(flights).zip(&blocks) {
                    self.cache.put_ready(&mut st, k, data.clone());
                    f.finish(Ok(data.clone()));
                }
                Ok(blocks)
            }
            Err(e) => {
                for (k, f) in keys.zip(flights) {
                    st.map.remove(&k);
                    f.finish(Err(clone_error(&e)));
                }
                Err(e)
            }
        }
    }

    /// Notes a read of blocks `[first, last]`; returns whether it belongs to a sequential
    /// stream. A read starting within [`SEQUENTIAL_SLACK_BLOCKS`] of a stream's frontier (the
    /// furthest block it read) belongs to it (concurrent readers of one stream arrive a little
    /// out of order), and extends its streak if it moves the frontier forward; a read near no
    /// stream starts a new one, replacing the least recently used of [`STREAMS_MAX`].
    fn note_read(&self, first: u64, last: u64) -> bool {
        // Never wait for it: a read that finds another one noting is not noted (a stream's
        // other reads still are), which keeps warm random reads from queueing here.
        let Ok(mut q) = self.seq.try_lock() else {
            return false;
        };
        q.clock += 1;
        let now = q.clock;
        let near =
            |f: u64| first + SEQUENTIAL_SLACK_BLOCKS >= f && first <= f + SEQUENTIAL_SLACK_BLOCKS;
        if let Some(s) = q.streams.iter_mut().find(|s| near(s.frontier)) {
            if last > s.frontier {
                s.streak = s.streak.saturating_add(1);
                s.frontier = last;
            }
            s.used = now;
            return s.streak >= SEQUENTIAL_READS_MIN;
        }
        let fresh = Stream {
            frontier: last,
            streak: 1,
            used: now,
        };
        if q.streams.len() < STREAMS_MAX {
            q.streams.push(fresh);
        } else if let Some(s) = q.streams.iter_mut().min_by_key(|s| s.used) {
            *s = fresh;
        }
        false
    }

    /// Keeps at least half the readahead window fetched (or being fetched) past `last`: when
    /// less is, marks the next window's missing blocks as loading and fetches them in runs of
    /// at most [`FETCH_BYTES_MAX`] on the readahead threads.
    fn read_ahead(self: &Arc<Self>, last: u64) {
        let c = &self.cache;
        let window = c.readahead_blocks;
        let end = self.blocks();
        if window == 0 || last + 1 >= end {
            return;
        }
        // Blocks present (or coming) right after `last`, up to half the window.
        let ahead = |st: &State| {
            let mut n = 0;
            while last + 1 + n < end
                && n < window / 2
                && st.map.contains_key(&self.key(last + 1 + n))
            {
                n += 1;
            }
            n
        };
        if ahead(&c.state.read().unwrap()) >= window / 2 {
            return; // the usual case: checked without the write lock
        }
        let mut runs: Vec<(u64, Vec<Arc<Flight>>)> = Vec::new();
        {
            let mut st = c.state.write().unwrap();
            let ahead = ahead(&st);
            if ahead >= window / 2 {
                return;
            }
            let per_fetch = (FETCH_BYTES_MAX / c.block_bytes).max(1) as usize;
            let stop = (last + 1 + window).min(end);
            for index in last + 1 + ahead..stop {
                let k = self.key(index);
                if st.map.contains_key(&k) {
                    continue;
                }
                let f = Flight::new(true);
                st.map.insert(k, Slot::Loading(f.clone()));
                match runs.last_mut() {
                    Some((s, fs)) if *s + fs.len() as u64 == index && fs.len() < per_fetch => {
                        fs.push(f)
                    }
                    _ => runs.push((index, vec![f])),
                }
            }
        }
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
        let (first, last) = (offset / bs, (end - 1) / bs);
        if c.capacity_bytes == 0 || (last - first + 1) * bs > c.capacity_bytes / 2 {
            c.counters.bypass_reads.fetch_add(1, Ordering::Relaxed);
            return b.inner.read_into(offset, buf);
        }
        let mut plans = b.plan(first, last);
        if b.note_read(first, last) {
            b.read_ahead(last);
        }
        // Runs of blocks to fetch: (first block, flights), each at most FETCH_BYTES_MAX.
        let per_fetch = (FETCH_BYTES_MAX / bs).max(1) as usize;
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
        let fetched: Vec<Result<Blocks>> = if runs.len() <= 1 {
            runs.iter().map(|(s, fs)| b.fetch_run(*s, fs)).collect()
        } else {
            fetch_parallel(b, &runs)
        };
        for ((start, _), r) in runs.iter().zip(fetched) {
            for (j, data) in r?.into_iter().enumerate() {
                plans[(start - first) as usize + j] = Plan::Have(data);
            }
        }
        for (i, p) in plans.iter().enumerate() {
            let index = first + i as u64;
            let data = match p {
                Plan::Have(d) => d.clone(),
                Plan::Wait(f) | Plan::Fetch(f) => match f.wait() {
                    Ok(d) => d,
                    // A failed readahead is not this reader's failure: fetch it ourselves.
                    Err(_) if f.prefetch => {
                        let flight = Flight::new(false);
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
        for i in 0..4 {
            read(&b, i * bs, 1);
        }
        assert_eq!(cache.stats().held_bytes, 4 * bs);
        read(&b, 0, 1); // block 0 is now the most recently used
        read(&b, 4 * bs, 1); // the hand spares block 0 (read since) and evicts block 1
        let s = cache.stats();
        assert_eq!((s.held_bytes, s.evicted_blocks), (4 * bs, 1));
        let before = reads.lock().unwrap().len();
        read(&b, 0, 1);
        assert_eq!(
            reads.lock().unwrap().len(),
            before,
            "block 0 should still be cached"
        );
        read(&b, bs, 1);
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
        let cache = Arc::new(BlockCache::new(16 * bs, bs).unwrap());
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
                Slot::Ready { data, .. } => {
                    assert_eq!(data.run.bytes.len(), data.len(), "a block shares a buffer");
                    data.len() as u64
                }
                Slot::Loading(_) => 0,
            })
            .sum();
        assert_eq!(ready, st.held_bytes);
        let ready_blocks = st
            .map
            .values()
            .filter(|s| matches!(s, Slot::Ready { .. }))
            .count();
        assert_eq!(
            st.ring.len(),
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
        let cache = Arc::new(BlockCache::new(16 * bs, bs).unwrap());
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
        assert_eq!(st.ring.len(), st.map.len());
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
        // 64 MiB cache: the readahead window is its quarter's cap, READAHEAD_BYTES (32 MiB).
        let cache = Arc::new(BlockCache::new(64 << 20, bs).unwrap());
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
        // The first reads fetch for themselves; after that whole windows come in 8 MiB GETs.
        assert!(
            r.len() <= 12,
            "{} reads for {blocks} blocks: {r:?}",
            r.len()
        );
        assert!(r.iter().all(|&(_, n)| n as u64 <= FETCH_BYTES_MAX), "{r:?}");
        let s = cache.stats();
        assert!(s.readahead_blocks >= blocks - 4, "{s:?}");
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
        assert!(n <= 24, "{n} reads for two streams");
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
        let f = Flight::new(true);
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
        for _ in 0..(POOL_BUFFERS_MAX + 4) {
            give_buffer(vec![7u8; 2 << 20]);
        }
        assert!(BUFFERS.lock().unwrap().len() <= POOL_BUFFERS_MAX);
        give_buffer(vec![0u8; 1000]); // too small to keep
        assert!(BUFFERS
            .lock()
            .unwrap()
            .iter()
            .all(|b| b.capacity() >= POOL_BUFFER_BYTES_MIN));
        let b = take_buffer(3 << 20);
        assert_eq!(b.len(), 3 << 20);
        let b = take_buffer(1 << 20);
        assert_eq!(b.len(), 1 << 20);
        assert!(b.capacity() >= 1 << 20);
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
}
