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
//! - **bounded**: ready blocks are kept in LRU order and the least recently used are dropped
//!   as soon as their bytes exceed `capacity_bytes`. Blocks being fetched, and blocks a
//!   reader is still copying out of, are not counted (they are transient, bounded by the
//!   reads in flight).
//!
//! Reads that would need more blocks than half the cache bypass it (a full scan of a large
//! layer must not evict everything), as does every read when `capacity_bytes` is 0.

use super::{BlobReader, Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Longest single ranged read the cache issues. A longer run of missing blocks is split into
/// reads of this size, fetched in parallel (a single stream rarely fills a link to S3).
pub const FETCH_BYTES_MAX: u64 = 8 << 20;

/// Most parallel reads one cache read issues for a long run of missing blocks.
pub const FETCH_PARALLEL_MAX: usize = 8;

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
    /// Bytes of ready blocks held now.
    pub held_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    blob: Arc<str>,
    index: u64,
}

/// A fetch in progress, shared by every reader waiting for its block.
struct Flight {
    result: Mutex<Option<std::result::Result<Arc<[u8]>, Error>>>,
    done: Condvar,
}

impl Flight {
    fn new() -> Arc<Flight> {
        Arc::new(Flight {
            result: Mutex::new(None),
            done: Condvar::new(),
        })
    }

    fn finish(&self, r: std::result::Result<Arc<[u8]>, Error>) {
        *self.result.lock().unwrap() = Some(r);
        self.done.notify_all();
    }

    fn wait(&self) -> Result<Arc<[u8]>> {
        let mut g = self.result.lock().unwrap();
        loop {
            if let Some(r) = g.as_ref() {
                return r.as_ref().map(Arc::clone).map_err(clone_error);
            }
            g = self.done.wait(g).unwrap();
        }
    }
}

enum Slot {
    Ready { data: Arc<[u8]>, tick: u64 },
    Loading(Arc<Flight>),
}

#[derive(Default)]
struct State {
    map: HashMap<BlockKey, Slot>,
    /// Ready blocks by last use (ascending tick = least recently used first).
    lru: BTreeMap<u64, BlockKey>,
    next_tick: u64,
    held_bytes: u64,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }
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
}

/// The cache. Share it (`Arc`) between every blob of a store: the byte bound is global.
pub struct BlockCache {
    capacity_bytes: u64,
    block_bytes: u64,
    state: Mutex<State>,
    counters: Counters,
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
        Ok(BlockCache {
            capacity_bytes,
            block_bytes,
            state: Mutex::new(State::default()),
            counters: Counters::default(),
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
            held_bytes: self.state.lock().unwrap().held_bytes,
        }
    }

    /// `reader` (the blob stored under `key`) read through this cache.
    pub fn wrap(self: &Arc<Self>, key: &str, reader: Box<dyn BlobReader>) -> CachedBlob {
        CachedBlob {
            cache: self.clone(),
            key: Arc::from(key),
            inner: reader,
        }
    }

    /// Puts a block that was fetched some other way (e.g. with the request that learned the
    /// blob's size). `data` must be the whole block (shorter only for the blob's last block).
    /// Ignored if the block is already present or being fetched.
    pub fn insert(&self, key: &str, index: u64, data: Vec<u8>) {
        if self.capacity_bytes == 0 || data.is_empty() {
            return;
        }
        let k = BlockKey {
            blob: Arc::from(key),
            index,
        };
        let mut st = self.state.lock().unwrap();
        if st.map.contains_key(&k) {
            return;
        }
        self.put_ready(&mut st, k, Arc::from(data));
    }

    /// Inserts a ready block (the key must be absent or Loading) and evicts down to the bound.
    fn put_ready(&self, st: &mut State, k: BlockKey, data: Arc<[u8]>) {
        let tick = st.tick();
        st.held_bytes += data.len() as u64;
        st.lru.insert(tick, k.clone());
        st.map.insert(k, Slot::Ready { data, tick });
        while st.held_bytes > self.capacity_bytes {
            let Some((_, victim)) = st.lru.pop_first() else {
                break;
            };
            if let Some(Slot::Ready { data, .. }) = st.map.remove(&victim) {
                st.held_bytes -= data.len() as u64;
                self.counters.evicted_blocks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The blocks of one fetched run, in order.
type Blocks = Vec<Arc<[u8]>>;

/// What a read does about one block.
enum Plan {
    Have(Arc<[u8]>),
    Wait(Arc<Flight>),
    Fetch(Arc<Flight>),
}

/// A blob read through a [`BlockCache`].
pub struct CachedBlob {
    cache: Arc<BlockCache>,
    key: Arc<str>,
    inner: Box<dyn BlobReader>,
}

impl CachedBlob {
    fn block_len(&self, index: u64) -> u64 {
        let bs = self.cache.block_bytes;
        bs.min(self.inner.size_bytes() - index * bs)
    }

    /// Decides, under the lock, which blocks are present, awaited or ours to fetch.
    fn plan(&self, first: u64, last: u64) -> Vec<Plan> {
        let c = &self.cache;
        let mut st = c.state.lock().unwrap();
        let mut plans = Vec::with_capacity((last - first + 1) as usize);
        for index in first..=last {
            let k = BlockKey {
                blob: self.key.clone(),
                index,
            };
            let tick = st.tick();
            let plan = match st.map.get_mut(&k) {
                Some(Slot::Ready { data, tick: t }) => {
                    let old = std::mem::replace(t, tick);
                    let data = data.clone();
                    st.lru.remove(&old);
                    st.lru.insert(tick, k);
                    c.counters.hit_blocks.fetch_add(1, Ordering::Relaxed);
                    Plan::Have(data)
                }
                Some(Slot::Loading(f)) => {
                    c.counters.joined_blocks.fetch_add(1, Ordering::Relaxed);
                    Plan::Wait(f.clone())
                }
                None => {
                    let f = Flight::new();
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
        let mut buf = vec![0u8; (end - start * bs) as usize];
        let c = &self.cache.counters;
        c.fetches.fetch_add(1, Ordering::Relaxed);
        let r = self.inner.read_at(start * bs, &mut buf);
        let mut st = self.cache.state.lock().unwrap();
        let keys = (start..start + n).map(|index| BlockKey {
            blob: self.key.clone(),
            index,
        });
        match r {
            Ok(()) => {
                c.fetched_bytes
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                let blocks: Blocks = buf.chunks(bs as usize).map(Arc::from).collect();
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
}

impl BlobReader for CachedBlob {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.inner.size_bytes();
        let end = offset.checked_add(buf.len() as u64);
        if buf.is_empty() || end.is_none_or(|e| e > size) {
            // Nothing to cache; the reader says what is wrong with the range, if anything.
            return self.inner.read_at(offset, buf);
        }
        let end = end.unwrap();
        let c = &self.cache;
        let bs = c.block_bytes;
        let (first, last) = (offset / bs, (end - 1) / bs);
        if c.capacity_bytes == 0 || (last - first + 1) * bs > c.capacity_bytes / 2 {
            c.counters.bypass_reads.fetch_add(1, Ordering::Relaxed);
            return self.inner.read_at(offset, buf);
        }
        let mut plans = self.plan(first, last);
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
            runs.iter().map(|(s, fs)| self.fetch_run(*s, fs)).collect()
        } else {
            fetch_parallel(self, &runs)
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
                Plan::Wait(f) | Plan::Fetch(f) => f.wait()?,
            };
            debug_assert_eq!(data.len() as u64, self.block_len(index));
            let block_start = index * bs;
            let from = offset.max(block_start);
            let to = end.min(block_start + data.len() as u64);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            dst.copy_from_slice(&data[(from - block_start) as usize..(to - block_start) as usize]);
        }
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

/// Fetches several runs at once, at most [`FETCH_PARALLEL_MAX`] at a time.
fn fetch_parallel(blob: &CachedBlob, runs: &[(u64, Vec<Arc<Flight>>)]) -> Vec<Result<Blocks>> {
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
    fn eviction_keeps_the_byte_bound_and_drops_least_recently_used() {
        let bs = 16 * KIB;
        let cache = Arc::new(BlockCache::new(4 * bs, bs).unwrap());
        let (b, reads) = blob(&cache, "blobs/a", 10 * bs as usize, 0);
        for i in 0..4 {
            read(&b, i * bs, 1);
        }
        assert_eq!(cache.stats().held_bytes, 4 * bs);
        read(&b, 0, 1); // block 0 is now the most recently used
        read(&b, 4 * bs, 1); // evicts block 1, the least recently used
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
