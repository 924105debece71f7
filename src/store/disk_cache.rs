//! The image cache's disk tier: blocks of remote blobs kept in one local file, below the
//! memory cache ([`super::cache::BlockCache`]), so that a working set larger than memory
//! reads at local-disk speed instead of going back to the object store.
//!
//! - **Layout**: `<dir>/blocks` is an array of slots of one cache block each (slot `i` at
//!   byte `i × block_bytes`); the file is sparse until slots are used. Which block a slot
//!   holds, its length and its CRC-32C live only in memory (about 32 bytes per slot, plus
//!   the map: ~70 bytes per 4 KiB block, 18 MiB for 1 GiB).
//! - **Verified on every read back**: a slot's bytes are checked against the CRC-32C taken
//!   from the bytes that came from the store. A mismatch (a flipped bit on the disk, a torn
//!   write) is never served: the slot is dropped and the block is fetched from the store
//!   again (counted in [`DiskStats::corrupt_blocks`]).
//! - **Bounded** by `size_bytes`: slots are reused by CLOCK (a hit sets a slot's bit).
//! - **Discarded at start**: the index is not persisted, so a restart (or a crash) begins
//!   with an empty file; nothing written by an earlier process is ever read. Blobs are
//!   immutable, so there is nothing to invalidate while running.
//! - **One process**: the directory is locked (`fs2`) for as long as the cache is open; a
//!   second mvps-te on the same directory refuses to start.
//! - Writes are off the read path: the memory cache hands fetched blocks to a writer thread
//!   through a bounded queue and drops them when it is full (a cache may forget).

use crate::engine::checksum::crc32c;
use fs2::FileExt;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The file holding the slots, inside the cache directory.
pub const BLOCKS_FILE: &str = "blocks";

/// The lock file that keeps a second process off the directory.
pub const LOCK_FILE: &str = "mvps-image-cache.lock";

/// Most slots (4 Gi): slot numbers are `u32`.
pub const SLOTS_MAX: u64 = u32::MAX as u64;

/// A block of a blob: the memory cache's blob number and the block's index.
pub type DiskKey = (u64, u64);

/// Counters of the disk tier (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Blocks served from the disk.
    pub hit_blocks: u64,
    /// Blocks written to the disk.
    pub written_blocks: u64,
    /// Blocks whose bytes failed their checksum when read back: dropped, never served.
    pub corrupt_blocks: u64,
    /// Slots reused for other blocks to stay within the size bound.
    pub evicted_blocks: u64,
    /// Write or read errors of the cache file (each turns into a miss).
    pub io_errors: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Free,
    /// Being written: not readable, not evictable.
    Busy,
    Ready,
}

#[derive(Clone, Copy)]
struct Slot {
    key: DiskKey,
    crc: u32,
    len: u32,
    /// Bumped whenever the slot is taken for another block: a reader that looked the slot up
    /// before can tell that its bytes changed under it.
    gen: u32,
    state: Use,
    referenced: bool,
}

struct State {
    map: HashMap<DiskKey, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    hand: u32,
}

#[derive(Default)]
struct Counters {
    hit_blocks: AtomicU64,
    written_blocks: AtomicU64,
    corrupt_blocks: AtomicU64,
    evicted_blocks: AtomicU64,
    io_errors: AtomicU64,
}

pub struct DiskCache {
    dir: PathBuf,
    file: File,
    /// Held (locked) while the cache is open.
    _lock: File,
    block_bytes: u64,
    slots: u32,
    state: Mutex<State>,
    counters: Counters,
}

impl DiskCache {
    /// Opens (creating it if needed) the cache directory `dir`, locks it, and starts an
    /// empty cache file of at most `size_bytes` (whole blocks of `block_bytes`). Whatever an
    /// earlier process left there is discarded.
    pub fn open(dir: &Path, size_bytes: u64, block_bytes: u64) -> Result<DiskCache, String> {
        let d = dir.display();
        let slots = (size_bytes / block_bytes.max(1)).min(SLOTS_MAX);
        if slots == 0 {
            return Err(format!(
                "image cache directory {d}: size {size_bytes} bytes is smaller than one \
                 block ({block_bytes} bytes); use 0 to disable the disk tier"
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("image cache directory {d}: {e}"))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(|e| format!("image cache directory {d}: cannot open lock file: {e}"))?;
        lock.try_lock_exclusive().map_err(|_| {
            format!("image cache directory {d} is in use by another mvps-te process (lock file {LOCK_FILE})")
        })?;
        // Start empty: the index of an earlier run is gone, so its bytes are unknown. A new
        // file (not a truncated one) also drops the old blocks from the disk at once.
        let path = dir.join(BLOCKS_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("image cache file {}: {e}", path.display())),
        }
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("image cache file {}: {e}", path.display()))?;
        let free_slot = Slot {
            key: (0, 0),
            crc: 0,
            len: 0,
            gen: 0,
            state: Use::Free,
            referenced: false,
        };
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            file,
            _lock: lock,
            block_bytes,
            slots: slots as u32,
            state: Mutex::new(State {
                map: HashMap::new(),
                slots: vec![free_slot; slots as usize],
                // Taken from the back: slot 0 first, so a fresh file grows from its start.
                free: (0..slots as u32).rev().collect(),
                hand: 0,
            }),
            counters: Counters::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    pub fn size_bytes(&self) -> u64 {
        u64::from(self.slots) * self.block_bytes
    }

    pub fn stats(&self) -> DiskStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DiskStats {
            hit_blocks: get(&c.hit_blocks),
            written_blocks: get(&c.written_blocks),
            corrupt_blocks: get(&c.corrupt_blocks),
            evicted_blocks: get(&c.evicted_blocks),
            io_errors: get(&c.io_errors),
        }
    }

    fn offset(&self, slot: u32) -> u64 {
        u64::from(slot) * self.block_bytes
    }

    /// The block `key` if it is on disk with exactly `len` bytes and they pass their
    /// checksum; `None` otherwise (a corrupt slot is dropped on the way).
    pub fn get(&self, key: DiskKey, len: usize) -> Option<Vec<u8>> {
        self.get_many(&[(key, len)]).pop().flatten()
    }

    /// [`DiskCache::get`] for several blocks: blocks in consecutive slots are read with one
    /// `pread` (a run fetched together was usually written together).
    pub fn get_many(&self, wanted: &[(DiskKey, usize)]) -> Vec<Option<Vec<u8>>> {
        let mut out: Vec<Option<Vec<u8>>> = vec![None; wanted.len()];
        // (position in `wanted`, slot, crc, gen) of the blocks present.
        let found: Vec<(usize, u32, u32, u32)> = {
            let mut st = self.state.lock().unwrap();
            let mut found = Vec::new();
            for (i, &(key, len)) in wanted.iter().enumerate() {
                let Some(&slot) = st.map.get(&key) else {
                    continue;
                };
                let m = &mut st.slots[slot as usize];
                if m.len as usize == len {
                    m.referenced = true;
                    found.push((i, slot, m.crc, m.gen));
                }
            }
            found
        };
        if found.is_empty() {
            return out;
        }
        let bs = self.block_bytes as usize;
        let mut intact = vec![false; found.len()];
        // Blocks in consecutive slots, all but the last whole: one read.
        let joins = |b: usize| found[b].1 == found[b - 1].1 + 1 && wanted[found[b - 1].0].1 == bs;
        for std::ops::Range { start: a, end: b } in runs(found.len(), joins) {
            let lens: Vec<usize> = found[a..b].iter().map(|f| wanted[f.0].1).collect();
            let mut buf = vec![0u8; lens.iter().sum()];
            match self.file.read_exact_at(&mut buf, self.offset(found[a].1)) {
                Ok(()) => {
                    let mut at = 0;
                    for (k, len) in lens.iter().enumerate() {
                        let bytes = &buf[at..at + len];
                        intact[a + k] = crc32c(bytes) == found[a + k].2;
                        out[found[a + k].0] = Some(bytes.to_vec());
                        at += len;
                    }
                }
                Err(e) => self.io_error("read", &e),
            }
        }
        let mut st = self.state.lock().unwrap();
        let mut corrupt = Vec::new();
        for (k, &(i, slot, _, gen)) in found.iter().enumerate() {
            let m = st.slots[slot as usize];
            if m.gen != gen || m.state != Use::Ready {
                out[i] = None; // taken for another block while we read: not ours any more
                continue;
            }
            if out[i].is_some() && !intact[k] {
                out[i] = None;
                st.map.remove(&wanted[i].0);
                st.slots[slot as usize].state = Use::Free;
                st.free.push(slot);
                corrupt.push(slot);
            }
        }
        drop(st);
        let hits = out.iter().filter(|o| o.is_some()).count() as u64;
        self.counters.hit_blocks.fetch_add(hits, Ordering::Relaxed);
        for slot in corrupt {
            self.counters.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "image cache file {}: block in slot {slot} failed its checksum; dropped, \
                 fetching it from the image store again",
                self.dir.join(BLOCKS_FILE).display()
            );
        }
        out
    }

    /// Drops blocks `keys` that are on disk and not being written (bytes that failed a check
    /// above the cache: they are not to be served again).
    pub fn remove(&self, keys: &[DiskKey]) {
        let mut st = self.state.lock().unwrap();
        for key in keys {
            let Some(&slot) = st.map.get(key) else {
                continue;
            };
            if st.slots[slot as usize].state == Use::Ready {
                st.map.remove(key);
                st.slots[slot as usize].state = Use::Free;
                st.free.push(slot);
            }
        }
    }

    /// Writes block `key` (at most one block of bytes) unless it is on disk already.
    pub fn put(&self, key: DiskKey, data: &[u8]) {
        self.put_run(key.0, key.1, data);
    }

    /// Writes blocks `first..` of blob `blob`, cut from `data` (whole blocks, the last one
    /// possibly short), except those on disk already. Blocks that get consecutive slots are
    /// written with one `pwrite`.
    pub fn put_run(&self, blob: u64, first: u64, data: &[u8]) {
        let bs = self.block_bytes as usize;
        let chunks: Vec<&[u8]> = data.chunks(bs).collect();
        // (block number in the run, slot)
        let slots: Vec<(usize, u32)> = {
            let mut st = self.state.lock().unwrap();
            let mut slots = Vec::with_capacity(chunks.len());
            for i in 0..chunks.len() {
                if st.map.contains_key(&(blob, first + i as u64)) {
                    continue;
                }
                let Some(slot) = self.take_slot(&mut st) else {
                    break; // every slot is being written: skip the rest
                };
                slots.push((i, slot));
            }
            slots
        };
        let mut written = vec![true; slots.len()];
        // Consecutive blocks into consecutive slots: one write.
        let joins = |b: usize| slots[b].0 == slots[b - 1].0 + 1 && slots[b].1 == slots[b - 1].1 + 1;
        for std::ops::Range { start: a, end: b } in runs(slots.len(), joins) {
            let from = slots[a].0 * bs;
            let to = (slots[b - 1].0 * bs + bs).min(data.len());
            if let Err(e) = self
                .file
                .write_all_at(&data[from..to], self.offset(slots[a].1))
            {
                self.io_error("write", &e);
                written[a..b].fill(false);
            }
        }
        let crcs: Vec<u32> = slots.iter().map(|s| crc32c(chunks[s.0])).collect();
        let mut st = self.state.lock().unwrap();
        for (k, &(i, slot)) in slots.iter().enumerate() {
            if !written[k] {
                st.slots[slot as usize].state = Use::Free;
                st.free.push(slot);
                continue;
            }
            let key = (blob, first + i as u64);
            let m = &mut st.slots[slot as usize];
            m.key = key;
            m.crc = crcs[k];
            m.len = chunks[i].len() as u32;
            m.state = Use::Ready;
            m.referenced = false;
            // Two writers of one block: the later slot wins, the earlier one is freed.
            if let Some(old) = st.map.insert(key, slot) {
                st.slots[old as usize].state = Use::Free;
                st.free.push(old);
            }
        }
        drop(st);
        let n = written.iter().filter(|w| **w).count() as u64;
        self.counters.written_blocks.fetch_add(n, Ordering::Relaxed);
    }

    /// A slot to write into, marked busy with a new generation: a free one, else one taken
    /// from its block by the CLOCK hand (a slot read since the hand last passed is spared
    /// once). `None` if none can be taken (all are being written).
    fn take_slot(&self, st: &mut State) -> Option<u32> {
        let slot = match st.free.pop() {
            Some(s) => s,
            None => {
                let mut found = None;
                for _ in 0..2 * u64::from(self.slots) {
                    let h = st.hand;
                    st.hand = (h + 1) % self.slots;
                    let m = &mut st.slots[h as usize];
                    if m.state != Use::Ready {
                        continue;
                    }
                    if m.referenced {
                        m.referenced = false;
                        continue;
                    }
                    let old = m.key;
                    st.map.remove(&old);
                    self.counters.evicted_blocks.fetch_add(1, Ordering::Relaxed);
                    found = Some(h);
                    break;
                }
                found?
            }
        };
        let m = &mut st.slots[slot as usize];
        m.state = Use::Busy;
        m.gen = m.gen.wrapping_add(1);
        Some(slot)
    }

    fn io_error(&self, op: &str, e: &std::io::Error) {
        // Logged once per 1000 errors: a full or failing disk must not flood the log.
        let n = self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(1000) {
            log::warn!(
                "image cache file {}: {op} failed: {e} (served from the image store instead; \
                 {} such errors so far)",
                self.dir.join(BLOCKS_FILE).display(),
                n + 1
            );
        }
    }
}

/// `0..n` cut into maximal ranges in which each element `b` `joins` the one before it.
fn runs(n: usize, joins: impl Fn(usize) -> bool) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut a = 0;
    while a < n {
        let mut b = a + 1;
        while b < n && joins(b) {
            b += 1;
        }
        out.push(a..b);
        a = b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 4096;

    fn block(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn blocks_round_trip_within_the_size_bound() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskCache::open(dir.path(), 4 * BS, BS).unwrap();
        assert_eq!(d.size_bytes(), 4 * BS);
        for i in 0..4u64 {
            d.put((1, i), &block(i as u8, BS as usize));
        }
        d.put((1, 9), &block(9, 100)); // a short last block
        for i in 1..4u64 {
            assert_eq!(
                d.get((1, i), BS as usize),
                Some(block(i as u8, BS as usize))
            );
        }
        assert_eq!(d.get((1, 9), 100), Some(block(9, 100)));
        // Five blocks in four slots: the one not read since the hand passed (block 0) went.
        assert_eq!(d.get((1, 0), BS as usize), None);
        assert_eq!(
            d.get((1, 9), 99),
            None,
            "a different length is not this block"
        );
        let s = d.stats();
        assert_eq!(
            (s.written_blocks, s.evicted_blocks, s.hit_blocks),
            (5, 1, 4)
        );
        let len = std::fs::metadata(dir.path().join(BLOCKS_FILE))
            .unwrap()
            .len();
        assert!(len <= 4 * BS, "the file outgrew its bound: {len}");
    }

    /// A flipped byte in the cache file is caught by the block's checksum: the block is
    /// dropped and reported missing (the memory cache then fetches it again), never served.
    #[test]
    fn a_flipped_byte_is_detected_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskCache::open(dir.path(), 8 * BS, BS).unwrap();
        d.put((3, 0), &block(1, BS as usize));
        d.put((3, 1), &block(2, BS as usize));
        let path = dir.path().join(BLOCKS_FILE);
        let mut raw = std::fs::read(&path).unwrap();
        raw[BS as usize + 77] ^= 0x10; // slot 1: block (3, 1)
        std::fs::write(&path, &raw).unwrap();
        assert_eq!(d.get((3, 1), BS as usize), None);
        assert_eq!(d.stats().corrupt_blocks, 1);
        assert_eq!(d.get((3, 0), BS as usize), Some(block(1, BS as usize)));
        // Written again (as after the refetch), it is served again.
        d.put((3, 1), &block(2, BS as usize));
        assert_eq!(d.get((3, 1), BS as usize), Some(block(2, BS as usize)));
    }

    /// What an earlier process left is never read (its index is gone); a second process
    /// cannot open a directory in use.
    #[test]
    fn a_restart_discards_the_file_and_the_directory_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskCache::open(dir.path(), 8 * BS, BS).unwrap();
        d.put((0, 0), &block(5, BS as usize));
        let second = DiskCache::open(dir.path(), 8 * BS, BS);
        assert!(second.err().unwrap().contains("in use by another"));
        drop(d);
        let d = DiskCache::open(dir.path(), 8 * BS, BS).unwrap();
        assert_eq!(d.get((0, 0), BS as usize), None);
        let len = std::fs::metadata(dir.path().join(BLOCKS_FILE))
            .unwrap()
            .len();
        assert_eq!(len, 0, "the old blocks were not dropped");
        assert!(DiskCache::open(&dir.path().join("x"), 100, BS).is_err());
    }
}
