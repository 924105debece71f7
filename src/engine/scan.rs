//! Image-level readahead: the scan hint.
//!
//! The block cache (`store::cache`) finds sequential streams per blob. An image read in order
//! crosses layers, though: each base layer holds a stretch of the image and each delta layer a
//! few pages of every stretch, so every layer boundary would start a new blob stream, with a
//! small first window and its first reads fetched by the readers themselves. A *scan* is a
//! sequential stream of the image: when a read continues one (by the same rule as a blob's
//! stream, [`Streams::follows`], in pages rather than blocks), the session resolves the
//! next window of image pages to the layers that hold them, and each layer's reader is asked
//! to prefetch those data pages ([`crate::store::BlobReader::prefetch`]) within the cache's
//! global readahead budget. A delta layer's pages, scattered over the image, lie back to back
//! in its blob: one prefetch per layer and window.
//!
//! A scan's window starts at [`SCAN_WINDOW_INITIAL_READS`] of its reads and grows by
//! [`SCAN_GROWTH`] pages per page it reads (tripling per window consumed) up to
//! [`SCAN_WINDOW_BYTES_MAX`]; it halves when the cache evicts one of its prefetches unread.
//! It is refilled once less than half of it lies ahead, so each range is asked for once. A
//! random reader never builds a scan (its reads continue none), and pays one `try_lock`.

use super::layer::Layer;
use crate::store::cache::ScanWindow;
use crate::store::stream::{Streams, STREAMS_MAX};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Reads that moved a scan forward before it prefetches: a few, so that two reads that
/// happen to be neighbours are not taken for a scan.
pub const SCAN_READS_MIN: u32 = 4;

/// Scans tracked per image (an NBD client copying an image reads a few regions at once, one
/// per connection or thread); the least recently used is replaced.
pub const SCANS_MAX: usize = STREAMS_MAX;

/// A new scan's window, in its reads: nbdcopy's 256 KiB reads get 2 MiB.
pub const SCAN_WINDOW_INITIAL_READS: u64 = 8;

/// Largest window of a scan: four GETs of `cache::FETCH_BYTES_MAX` in flight, as many as the
/// cache has readahead threads. The cache's budget bounds it further.
pub const SCAN_WINDOW_BYTES_MAX: u64 = 32 << 20;

/// Pages a window grows by per page its scan reads.
pub const SCAN_GROWTH: u64 = 2;

/// A layer's pieces of one window go as one prefetch when at most this many bytes of its
/// blob lie between them: pages that newer layers shadow leave holes of a page or a few in
/// an older layer's data, and a GET per piece would be a GET per few pages.
pub const SCAN_HOLE_BYTES_MAX: u64 = 256 << 10;

/// A layer's run of a window shorter than this is lengthened to it: a layer's data is in
/// image order, so the pages after a run are the ones the scan will want next from that
/// layer (unless newer layers shadow them). A delta layer holds a few pages of every window:
/// without it, each window would cost a small GET per delta layer.
pub const SCAN_LAYER_RUN_BYTES_MIN: u64 = 512 << 10;

/// After the budget stopped a prefetch short, the scan asks again only once it has read
/// this fraction of its window: re-resolving the window on every read would cost CPU.
pub const SCAN_RETRY_DIVISOR: u64 = 8;

/// The scans of one image (a session).
pub struct Scans {
    page_size_bits: u32,
    /// The scans, as sequential streams of pages.
    state: Mutex<Streams<Scan>>,
    /// Pages asked for ahead, over all scans (for tests and logs).
    issued_pages: AtomicU64,
}

/// A scan's readahead (its frontier and streak are its stream's).
struct Scan {
    /// Pages kept asked for ahead of the frontier.
    window: u64,
    /// Pages below this were asked for.
    ahead_until: u64,
    /// No new prefetch before the frontier passes this (after the budget stopped one).
    retry_at: u64,
    /// The cache's accounting of this scan's prefetches.
    hint: Arc<ScanWindow>,
    /// `hint.wasted_blocks()` when last looked at.
    wasted_seen: u64,
    /// Per layer (blob id), the data page below which this scan asked for its data.
    layers: HashMap<String, u64>,
}

/// Pages `[first, first + pages)` to prefetch for a scan.
pub struct Ahead {
    pub first: u64,
    pub pages: u64,
    hint: Arc<ScanWindow>,
}

impl Scans {
    pub fn new(page_size_bits: u32) -> Scans {
        Scans {
            page_size_bits,
            state: Mutex::new(Streams::default()),
            issued_pages: AtomicU64::new(0),
        }
    }

    /// Pages asked for ahead so far, over all scans.
    pub fn issued_pages(&self) -> u64 {
        self.issued_pages.load(Ordering::Relaxed)
    }

    /// Scans that have read enough in order to prefetch, now.
    pub fn active(&self) -> usize {
        let q = self.state.lock().unwrap();
        q.iter().filter(|s| s.streak >= SCAN_READS_MIN).count()
    }

    /// Notes a read of pages `[first, first + n)`; returns what to prefetch, if anything.
    pub fn note(&self, first: u64, n: u64) -> Option<Ahead> {
        // Never wait: a read that finds another one noting is not noted (its scan's other
        // reads are), so that concurrent random readers do not queue here.
        let Ok(mut q) = self.state.try_lock() else {
            return None;
        };
        let bits = self.page_size_bits;
        let last = first + n - 1;
        let max = (SCAN_WINDOW_BYTES_MAX >> bits).max(1);
        let initial = (SCAN_WINDOW_INITIAL_READS * n).min(max);
        let fresh = || Scan {
            window: initial,
            ahead_until: last + 1,
            retry_at: 0,
            hint: Arc::default(),
            wasted_seen: 0,
            layers: HashMap::new(),
        };
        let followed = q.follows(first, last, 1 << bits, fresh)?;
        let streak = followed.stream.streak;
        let s = &mut followed.stream.state;
        if let Some(before) = followed.advanced_from {
            if streak > SCAN_READS_MIN {
                s.window = (s.window + SCAN_GROWTH * (last - before)).min(max);
            }
            s.window = s.window.max(initial);
        }
        let wasted = s.hint.wasted_blocks();
        if wasted > s.wasted_seen {
            s.wasted_seen = wasted;
            s.window = (s.window / 2).max(initial);
        }
        if streak < SCAN_READS_MIN || last < s.retry_at {
            return None;
        }
        let from = s.ahead_until.max(last + 1);
        let to = last + 1 + s.window;
        if from >= to || from - (last + 1) >= s.window / 2 {
            return None;
        }
        s.ahead_until = to;
        Some(Ahead {
            first: from,
            pages: to - from,
            hint: s.hint.clone(),
        })
    }

    /// Prefetches what `a` resolved to: `pieces` are (image page, layer, data page, pages),
    /// in any order. A layer's pieces at most [`SCAN_HOLE_BYTES_MAX`] apart in its data go
    /// as one prefetch (holes included), less what the scan asked for of that layer before,
    /// and at least [`SCAN_LAYER_RUN_BYTES_MIN`] of it. If the cache's budget stops one
    /// short, the scan asks again from there later.
    pub fn prefetch<'a>(
        &self,
        a: Ahead,
        pieces: impl Iterator<Item = (u64, &'a Arc<Layer>, u64, u64)>,
    ) {
        // (layer, first data page, pages, first image page)
        let mut runs: Vec<(&Arc<Layer>, u64, u64, u64)> = Vec::new();
        let mut sorted: Vec<_> = pieces.collect();
        sorted.sort_by_key(|&(_, layer, data, _)| (Arc::as_ptr(layer) as usize, data));
        let hole = SCAN_HOLE_BYTES_MAX >> self.page_size_bits;
        for (page, layer, data, pages) in sorted {
            match runs.last_mut() {
                Some(r) if Arc::ptr_eq(r.0, layer) && r.1 + r.2 + hole >= data => {
                    r.2 = data + pages - r.1;
                    r.3 = r.3.min(page);
                }
                _ => runs.push((layer, data, pages, page)),
            }
        }
        let min = SCAN_LAYER_RUN_BYTES_MIN >> self.page_size_bits;
        {
            let mut q = self.state.lock().unwrap();
            let scan = q.iter_mut().find(|s| Arc::ptr_eq(&s.state.hint, &a.hint));
            let Some(s) = scan.map(|s| &mut s.state) else {
                return; // replaced by another scan meanwhile
            };
            runs.retain_mut(|r| {
                let until = s.layers.get(&r.0.blob_id).copied().unwrap_or(0);
                if r.1 + r.2 <= until {
                    return false;
                }
                let start = r.1.max(until);
                let end = (r.1 + r.2).max(start + min).min(r.0.data_pages());
                (r.1, r.2) = (start, end - start);
                s.layers.insert(r.0.blob_id.clone(), end);
                true
            });
        }
        let mut stopped = Vec::new();
        for (layer, data, pages, page) in runs {
            if !layer.prefetch_data(data, pages, &a.hint) {
                stopped.push((layer, data, page));
            }
        }
        let at = stopped.iter().map(|&(_, _, page)| page).min();
        let issued = at.map_or(a.pages, |p| p.saturating_sub(a.first));
        self.issued_pages.fetch_add(issued, Ordering::Relaxed);
        let Some(at) = at else {
            return;
        };
        let mut q = self.state.lock().unwrap();
        if let Some(scan) = q.iter_mut().find(|s| Arc::ptr_eq(&s.state.hint, &a.hint)) {
            let frontier = scan.frontier;
            let s = &mut scan.state;
            s.ahead_until = s.ahead_until.min(at);
            s.retry_at = frontier + s.window / SCAN_RETRY_DIVISOR;
            for (layer, data, _) in stopped {
                if let Some(until) = s.layers.get_mut(&layer.blob_id) {
                    *until = (*until).min(data);
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::cfg;
    use crate::engine::{testing, BufferStore};
    use crate::store::cache::BlockCache;
    use crate::store::local::LocalStore;
    use crate::store::{self, BlobReader, CreateOutcome, ImageStore, ObjectInfo};
    use std::path::Path;

    type Fetches = Arc<Mutex<Vec<(String, u64, usize)>>>;

    /// A local image store whose blobs are read through a block cache, counting the reads
    /// that reach the store (what would be GETs on S3).
    struct CachedLocal {
        local: LocalStore,
        cache: Arc<BlockCache>,
        fetches: Fetches,
    }

    struct CountedBlob {
        key: String,
        inner: Box<dyn BlobReader>,
        fetches: Fetches,
    }

    impl BlobReader for CountedBlob {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> store::Result<()> {
            let read = (self.key.clone(), offset, buf.len());
            self.fetches.lock().unwrap().push(read);
            self.inner.read_at(offset, buf)
        }
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
    }

    impl ImageStore for CachedLocal {
        fn get(&self, key: &str) -> store::Result<Vec<u8>> {
            self.local.get(key)
        }
        fn reads_ahead(&self) -> bool {
            true
        }
        fn open_blob(&self, key: &str) -> store::Result<Box<dyn BlobReader>> {
            let inner = self.local.open_blob(key)?;
            let counted = CountedBlob {
                key: key.to_string(),
                inner,
                fetches: self.fetches.clone(),
            };
            Ok(Box::new(self.cache.wrap(key, Box::new(counted))))
        }
        fn put(&self, key: &str, data: &[u8]) -> store::Result<()> {
            self.local.put(key, data)
        }
        fn put_file(&self, key: &str, path: &Path) -> store::Result<()> {
            self.local.put_file(key, path)
        }
        fn create_if_absent(&self, key: &str, data: &[u8]) -> store::Result<CreateOutcome> {
            self.local.create_if_absent(key, data)
        }
        fn list(&self, prefix: &str, limit: Option<usize>) -> store::Result<Vec<ObjectInfo>> {
            self.local.list(prefix, limit)
        }
        fn delete(&self, key: &str) -> store::Result<()> {
            self.local.delete(key)
        }
        fn describe(&self) -> String {
            format!("cached {}", self.local.describe())
        }
    }

    const BITS: u32 = 12;
    const LAYERS: u64 = 40;
    const LAYER_PAGES: u64 = 128;
    const IMAGE: &str = "scan.mvps-image";

    fn page_byte(p: u64) -> u8 {
        (p * 13 + p / 251) as u8
    }

    /// An image of `LAYERS` base layers of `LAYER_PAGES` pages each, side by side, and
    /// `LAYERS` newer one-page layers, one in the middle of each base layer (a hole in its
    /// data that reads skip), under a 4 KiB-block cache of 64 MiB; returns the session, the
    /// cache and the counted fetches.
    fn many_layers(
        dir: &Path,
    ) -> (
        Arc<BufferStore>,
        Arc<super::super::Session>,
        Arc<BlockCache>,
        Fetches,
    ) {
        let local = LocalStore::open(&dir.join("images")).unwrap();
        let base = (0..LAYERS).map(|i| (i * LAYER_PAGES, LAYER_PAGES));
        let holes = (0..LAYERS).map(|i| (i * LAYER_PAGES + LAYER_PAGES / 2, 1));
        let layers: Vec<(u64, u64)> = base.chain(holes).collect();
        testing::write_image(&local, dir, IMAGE, BITS, &layers, page_byte);
        let cache = Arc::new(BlockCache::new(64 << 20, 4 << 10).unwrap());
        let fetches = Fetches::default();
        let store = Arc::new(CachedLocal {
            local,
            cache: cache.clone(),
            fetches: fetches.clone(),
        });
        let b = Arc::new(BufferStore::open(&dir.join("buffer"), store, cfg()).unwrap());
        let s = b.attach(IMAGE, BITS).unwrap();
        (b, s, cache, fetches)
    }

    fn wait_for_readahead(cache: &BlockCache) {
        for _ in 0..500 {
            if cache.stats().readahead_unread_blocks == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Reading the image in order over 80 layers: after the scan's first reads, every range
    /// was fetched ahead of its reader (the readers fetch almost nothing themselves, however
    /// many layers they cross), no byte of any blob crossed twice, and a base layer's data
    /// came in one or two GETs (a window's end may cut it), not one per piece between holes.
    #[test]
    fn a_sequential_scan_over_many_layers_fetches_each_range_once_and_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let (_b, s, cache, fetches) = many_layers(dir.path());
        let before = cache.stats();
        let opened = fetches.lock().unwrap().len();
        let read_pages = 16u64; // 64 KiB reads
        let mut buf = vec![0u8; (read_pages << BITS) as usize];
        for first in (0..LAYERS * LAYER_PAGES).step_by(read_pages as usize) {
            s.read(None, first << BITS, &mut buf).unwrap();
            for (i, page) in buf.chunks(1 << BITS).enumerate() {
                let want = page_byte(first + i as u64);
                assert!(page.iter().all(|&x| x == want), "page {}", first + i as u64);
            }
        }
        wait_for_readahead(&cache);
        let after = cache.stats();
        // Before the scan starts (SCAN_READS_MIN reads, then its first window), the reader
        // fetches for itself; after that, nothing: 40 layers without the scan would each
        // begin with reader fetches (3 reads = 48 blocks per layer).
        let own = after.miss_blocks - before.miss_blocks;
        let first_reads = u64::from(SCAN_READS_MIN) * read_pages;
        assert!(
            own <= first_reads,
            "readers fetched {own} blocks themselves"
        );
        assert!(s.scans.issued_pages() >= LAYERS * LAYER_PAGES - 2 * first_reads);
        assert!(after.scan_blocks > after.readahead_blocks / 2, "{after:?}");
        assert_eq!(after.refetched_blocks, 0);
        let mut got = fetches.lock().unwrap().clone();
        let data_gets = got.len() - opened;
        // One per hole layer, one per base layer and a few more where a window's end cut
        // one (88 here; 125 with a GET per piece between the holes).
        let bound = 2 * LAYERS + LAYERS / 4 + u64::from(SCAN_READS_MIN);
        assert!(data_gets as u64 <= bound, "{data_gets} GETs for the data");
        got.sort();
        for w in got.windows(2) {
            let ((k0, o0, l0), (k1, o1, _)) = (&w[0], &w[1]);
            assert!(
                k0 != k1 || o0 + *l0 as u64 <= *o1,
                "{k0} fetched twice: {w:?}"
            );
        }
    }

    /// Random reads build no scan and prefetch nothing through it.
    #[test]
    fn a_random_reader_builds_no_scan() {
        let dir = tempfile::tempdir().unwrap();
        let (_b, s, cache, _fetches) = many_layers(dir.path());
        let mut buf = vec![0u8; 1 << BITS];
        for i in 0..2000u64 {
            // A multiplicative hash of i: pages all over the image, in no order.
            let p = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % (LAYERS * LAYER_PAGES);
            s.read(None, p << BITS, &mut buf).unwrap();
            assert!(buf.iter().all(|&x| x == page_byte(p)));
        }
        assert_eq!(s.scans.active(), 0);
        assert_eq!(s.scans.issued_pages(), 0);
        assert_eq!(cache.stats().scan_blocks, 0);
    }

    /// The window: asked for once per half window consumed, each page once, growing while
    /// the scan reads, up to the maximum.
    #[test]
    fn a_scan_asks_for_each_page_once_with_a_growing_window() {
        let scans = Scans::new(BITS);
        let n = 64; // 256 KiB reads
        let mut next = None::<u64>;
        let mut sizes = Vec::new();
        for i in 0..2000u64 {
            if let Some(a) = scans.note(i * n, n) {
                // Contiguous, ahead of the read, never overlapping what was asked before.
                assert!(a.first > i * n + n - 1);
                if let Some(end) = next {
                    assert_eq!(a.first, end);
                }
                next = Some(a.first + a.pages);
                sizes.push(a.pages);
                scans.issued_pages.fetch_add(a.pages, Ordering::Relaxed);
            }
        }
        assert!(sizes.len() > 4);
        let max = SCAN_WINDOW_BYTES_MAX >> BITS;
        assert!(sizes.windows(2).take(3).all(|w| w[1] > w[0]), "{sizes:?}");
        assert!(sizes.iter().all(|&p| p <= max));
        assert!(sizes.iter().any(|&p| p >= max / 2 - n));
        assert!(scans.issued_pages() >= 1900 * n);
    }
}
