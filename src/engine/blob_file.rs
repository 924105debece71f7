//! Writing a blob file (a layer) in one go, fsynced at the end, with direct I/O.
//!
//! A layer is written once, fsynced, handed to the image store and not read back through
//! this file: caching it is pure cost. Written through the page cache, every byte is copied
//! into freshly allocated pages, accounted dirty, written back, then freed again (measured
//! on the benchmark VM with `dd`, 400 MB: 0.7–1.6 s of CPU buffered against 0.07–0.14 s
//! with `O_DIRECT`, deletion included). So the file is opened with `O_DIRECT` and written
//! from aligned buffers of `CHUNK_BYTES`; where the file system refuses direct I/O (tmpfs,
//! or an alignment it does not accept) the same writes go through the page cache, each
//! chunk handed to writeback as soon as it is written (`sync_file_range`) so that disk and
//! writer overlap. Either way the final `fsync` is the durability point.
//!
//! The file's first `reserved` bytes (a layer's header and index, known only once all data
//! is written) are written last, from a buffer kept in memory: with direct I/O a block can
//! only be written whole, and the block holding the end of the index also holds the start
//! of the data.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Offset, length and memory alignment of direct writes (the largest logical block size
/// in common use; file systems that need more fall back to buffered writes).
pub const DIRECT_IO_ALIGN: usize = 4096;
/// Bytes gathered in memory before one write. 2 MiB with four in flight keeps the disk busy
/// (a one-pass 8 GiB sequential write ran at 598 MB/s, 1.85× `nbdkit file`) at a window of
/// 15 MiB; 8 MiB chunks held 45 MiB, over half the server's memory budget (docs/PERFORMANCE.md).
pub const CHUNK_BYTES: usize = 2 << 20;

const _: () = assert!(CHUNK_BYTES.is_multiple_of(DIRECT_IO_ALIGN));

/// A heap buffer aligned to DIRECT_IO_ALIGN. Chunk buffers come from, and go back to, a
/// small process-wide pool (see [`POOLED_BUFFERS_MAX`]); their bytes are whatever the last
/// user left, which is safe because a `BlobFile` writes only bytes it filled or zeroed.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is owned memory like a Vec<u8>; nothing else aliases it.
unsafe impl Send for AlignedBuf {}

/// Chunk buffers kept for the next layer: one layer write's worth (its buffer and those in
/// flight). Allocating them afresh cost the checkpoint thread a `memset` of each, 12 %
/// of its CPU in a sustained sequential write (docs/PERFORMANCE.md); at most this many, about
/// 15 MiB, stay allocated between layers, and none once a job ends with no layer being
/// written (`release_idle_buffers`; the server's RSS is budgeted: docs/PERFORMANCE.md).
///
/// It is also what all layer writes together may hold (`CHUNKS_HELD`): a checkpoint and a
/// merge writing at once share it rather than holding a window each, except that a writer
/// with nothing in flight always gets one buffer, so that it cannot wait for itself.
pub const POOLED_BUFFERS_MAX: usize = 1 + WRITES_IN_FLIGHT_MAX;

/// Chunk buffers held by layer writes now (in use or in flight, not pooled).
static CHUNKS_HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether a writer with `in_flight` of its buffers at the disk (or on their way back) may
/// allocate another one while `held` chunk buffers are held in all.
fn may_allocate(in_flight: usize, held: usize) -> bool {
    in_flight == 0 || (in_flight < WRITES_IN_FLIGHT_MAX && held < POOLED_BUFFERS_MAX)
}

/// Chunk buffers are allocated in multiples of this (a layer's head, which shares the first
/// buffer, is 4 bytes per page: up to 1 MiB for CHECKPOINT_LAYER_PAGES_MAX pages).
const POOLED_BUFFER_GRANULE: usize = 1 << 20;

static POOL: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len, DIRECT_IO_ALIGN).expect("aligned buffer layout")
    }

    fn zeroed(len: usize) -> AlignedBuf {
        let len = len.max(1).next_multiple_of(DIRECT_IO_ALIGN);
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    /// Frees the memory (dropping a chunk buffer would pool it).
    fn free(self) {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: allocated in `zeroed` with this very layout; `this` is never used again.
        unsafe { std::alloc::dealloc(this.ptr.as_ptr(), Self::layout(this.len)) }
    }

    /// A buffer of at least `len` bytes: a pooled chunk if one is big enough, else a new one,
    /// rounded up to `POOLED_BUFFER_GRANULE`. Its contents are unspecified.
    fn chunk(len: usize) -> AlignedBuf {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        match pool.iter().position(|b| b.len >= len) {
            Some(i) => pool.swap_remove(i),
            None => {
                drop(pool);
                AlignedBuf::zeroed(len.next_multiple_of(POOLED_BUFFER_GRANULE))
            }
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` initialized bytes owned by self (zeroed when
        // allocated, written only through `deref_mut` since).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let (ptr, len) = (self.ptr, self.len);
        // Only chunk-sized buffers are pooled: a layer's first buffer also has room for its
        // head (up to 6 MiB for a checkpoint of scattered pages), and pooled it would serve
        // as a whole chunk afterwards, five of them 40 MiB (docs/PERFORMANCE.md).
        if len == CHUNK_BYTES {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOLED_BUFFERS_MAX {
                // The allocation moves into the pool; this value no longer owns it.
                pool.push(AlignedBuf { ptr, len });
                return;
            }
        }
        // SAFETY: allocated in `zeroed` with this very layout, and owned by nothing else now.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), Self::layout(len)) }
    }
}

/// Buffers written while the next is filled: with direct I/O a write returns only when the
/// disk has the data, so the writes go to a thread of their own and overlap the filling.
/// Four beat two by 7–14 % on sequential writes in two A/B pairs (docs/PERFORMANCE.md), at
/// a few chunks of buffers per layer being written.
pub const WRITES_IN_FLIGHT_MAX: usize = 4;

/// A write for the writer thread: `buf[from..end]` at file offset `at + from`.
struct Job {
    buf: AlignedBuf,
    from: usize,
    end: usize,
    at: u64,
}

/// A file written front to back, its first `reserved` bytes last (`finish`).
///
/// Callers fill the buffer in place (`spare`, `commit`), so data is copied once, from its
/// source into the buffer that goes to the disk.
pub struct BlobFile {
    file: File,
    direct: bool,
    reserved: usize,
    /// `reserved` rounded up to whole blocks: the blocks `finish` writes.
    head_len: usize,
    /// Those blocks, once the buffer moved past them.
    head: Option<AlignedBuf>,
    /// File bytes from `buf_at` on, `buf_len` of them, not yet written. Room for the head
    /// blocks and a chunk, so the first write (which keeps the head back) is a whole chunk.
    buf: AlignedBuf,
    buf_at: u64,
    buf_len: usize,
    /// Buffers in flight go to the writer thread and come back empty (or with its error).
    jobs: Option<std::sync::mpsc::SyncSender<Job>>,
    done: std::sync::mpsc::Receiver<io::Result<AlignedBuf>>,
    /// Buffers allocated for this file besides `buf`: in flight or on their way back.
    in_flight: usize,
    writer: Option<std::thread::JoinHandle<bool>>,
}

impl BlobFile {
    /// Creates (truncates) `path`, to hold `size_hint` bytes (blocks are preallocated; the
    /// final size is what was written).
    pub fn create(path: &Path, reserved: u64, size_hint: u64) -> io::Result<BlobFile> {
        let reserved = usize::try_from(reserved).map_err(|_| io::Error::other("head too big"))?;
        let head_len = reserved.next_multiple_of(DIRECT_IO_ALIGN);
        let (file, direct) = open(path)?;
        preallocate(&file, size_hint);
        let (jobs, todo) = std::sync::mpsc::sync_channel::<Job>(WRITES_IN_FLIGHT_MAX);
        let (give_back, done) = std::sync::mpsc::channel();
        let out = file.try_clone()?;
        let writer = std::thread::Builder::new()
            .name("blob-write".into())
            .spawn(move || {
                // Returns whether the file is still written directly (`write_at` may fall
                // back); after an error it only hands buffers back unwritten.
                let mut direct = direct;
                let mut failed = false;
                for job in todo {
                    let r = if failed {
                        Ok(())
                    } else {
                        let at = job.at + job.from as u64;
                        write_at(&out, &mut direct, &job.buf[job.from..job.end], at)
                    };
                    failed |= r.is_err();
                    if give_back.send(r.map(|()| job.buf)).is_err() {
                        break;
                    }
                }
                direct
            })?;
        CHUNKS_HELD.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(BlobFile {
            file,
            direct,
            reserved,
            head_len,
            head: None,
            // Not pooled (see `Drop`): allocated for this layer's head, freed after it.
            buf: AlignedBuf::chunk(head_len + CHUNK_BYTES),
            buf_at: 0,
            buf_len: reserved,
            jobs: Some(jobs),
            done,
            in_flight: 0,
            writer: Some(writer),
        })
    }

    /// Whether writes bypass the page cache (as far as `finish` knows, the writer thread
    /// having stopped).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Logical size so far (the reserved bytes count as written).
    fn size(&self) -> u64 {
        self.buf_at + self.buf_len as u64
    }

    /// Room for the next bytes, at least `unit` of them and a whole number of units (writing
    /// out what the buffer holds first if needed). Fill a prefix, then `commit` it.
    pub fn spare(&mut self, unit: usize) -> io::Result<&mut [u8]> {
        assert!(unit > 0 && unit <= CHUNK_BYTES / 2, "unit {unit}");
        if self.buf.len() - self.buf_len < unit {
            self.write_buf(false)?;
        }
        let room = (self.buf.len() - self.buf_len) / unit * unit;
        Ok(&mut self.buf[self.buf_len..self.buf_len + room])
    }

    /// The first `n` bytes `spare` returned are filled.
    pub fn commit(&mut self, n: usize) {
        assert!(self.buf_len + n <= self.buf.len());
        self.buf_len += n;
    }

    pub fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let spare = self.spare(1)?;
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            self.commit(n);
            data = &data[n..];
        }
        Ok(())
    }

    /// Writes `head` (exactly the reserved bytes) at the start, sets the final size and
    /// fsyncs. Returns the file's size.
    pub fn finish(mut self, head: &[u8]) -> io::Result<u64> {
        if head.len() != self.reserved {
            return Err(io::Error::other(format!(
                "blob head is {} bytes, {} were reserved",
                head.len(),
                self.reserved
            )));
        }
        let len = self.size();
        self.write_buf(true)?;
        // Every write is done once the writer thread has drained its queue and stopped.
        drop(self.jobs.take());
        let mut first_error = None;
        for r in self.done.iter() {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        let writer = self.writer.take().expect("one finish");
        self.direct = writer
            .join()
            .map_err(|_| io::Error::other("blob writer thread panicked"))?;
        if let Some(e) = first_error {
            return Err(e);
        }
        if let Some(mut blocks) = self.head.take() {
            blocks[..head.len()].copy_from_slice(head);
            write_at(&self.file, &mut self.direct, &blocks[..self.head_len], 0)?;
        }
        // Whole blocks were written: cut the padding of the last one off.
        if self.file.metadata()?.len() != len {
            self.file.set_len(len)?;
        }
        self.file.sync_all()?;
        Ok(len)
    }

    /// Hands the buffer's whole blocks, or with `all` everything (the last block
    /// zero-padded), to the writer thread, keeping the head blocks back; a partial last
    /// block moves to the front of the next buffer.
    fn write_buf(&mut self, all: bool) -> io::Result<()> {
        let end = if all {
            self.buf_len.next_multiple_of(DIRECT_IO_ALIGN)
        } else {
            self.buf_len / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN
        };
        if all {
            self.buf[self.buf_len..end].fill(0);
        }
        let mut from = 0;
        if self.buf_at == 0 && self.head.is_none() {
            // Zeroed, and only what was filled copied in (a tiny blob ends inside the head
            // blocks): the reused chunk buffer's stale bytes never reach the file.
            let mut blocks = AlignedBuf::zeroed(self.head_len);
            from = self.head_len.min(end);
            blocks[..from].copy_from_slice(&self.buf[..from]);
            self.head = Some(blocks);
        }
        let kept = self.buf_len.saturating_sub(end);
        let held = CHUNKS_HELD.load(std::sync::atomic::Ordering::Acquire);
        let mut next = if may_allocate(self.in_flight, held) {
            CHUNKS_HELD.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            self.in_flight += 1;
            AlignedBuf::chunk(CHUNK_BYTES)
        } else {
            match self.done.recv() {
                // The first buffer (head room and a chunk) is done with: a chunk replaces it.
                Ok(Ok(b)) if b.len != CHUNK_BYTES => AlignedBuf::chunk(CHUNK_BYTES),
                Ok(r) => r?,
                Err(_) => return Err(io::Error::other("blob writer thread stopped")),
            }
        };
        next[..kept].copy_from_slice(&self.buf[end..end + kept]);
        let job = Job {
            buf: std::mem::replace(&mut self.buf, next),
            from,
            end,
            at: self.buf_at,
        };
        if end > from {
            let jobs = self.jobs.as_ref().expect("not finished");
            if jobs.send(job).is_err() {
                return Err(io::Error::other("blob writer thread stopped"));
            }
        } else {
            // Nothing to write (all of it is head): the buffer goes back to the pool.
            self.in_flight -= 1;
            CHUNKS_HELD.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        self.buf_at += end as u64;
        self.buf_len = kept;
        Ok(())
    }
}

impl Drop for BlobFile {
    fn drop(&mut self) {
        // Unfinished (an error on the way): stop the writer thread before the file goes.
        drop(self.jobs.take());
        if let Some(w) = self.writer.take() {
            while self.done.recv().is_ok() {}
            let _ = w.join();
        }
        // Every chunk buffer of this file is back in the pool once `buf` is.
        drop(std::mem::replace(
            &mut self.buf,
            AlignedBuf::zeroed(DIRECT_IO_ALIGN),
        ));
        CHUNKS_HELD.fetch_sub(1 + self.in_flight, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Frees the pooled chunk buffers if no layer is being written. Called at the end of a job
/// (a checkpoint, a compaction step), not after each layer: a merge writes its output layers
/// one after another from the same buffers.
pub fn release_idle_buffers() {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if CHUNKS_HELD.load(std::sync::atomic::Ordering::Acquire) > 0 {
        return;
    }
    for buf in std::mem::take(&mut *pool) {
        buf.free();
    }
}

/// One positioned write; a direct write the file system refuses (EINVAL: alignment) turns
/// direct I/O off for the file and is retried through the page cache.
fn write_at(file: &File, direct: &mut bool, data: &[u8], at: u64) -> io::Result<()> {
    match file.write_all_at(data, at) {
        Err(e) if *direct && e.raw_os_error() == Some(libc::EINVAL) => {
            log::debug!("direct write refused ({e}); writing through the page cache");
            clear_direct(file)?;
            *direct = false;
            file.write_all_at(data, at)?;
        }
        r => r?,
    }
    if !*direct {
        start_writeback(file, at, data.len() as u64);
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn open(path: &Path) -> io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    match o.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((o.open(path)?, false)),
        Err(e) => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn open(path: &Path) -> io::Result<(File, bool)> {
    Ok((File::create(path)?, false))
}

/// Turns direct I/O off for an open file (its later writes go through the page cache).
#[cfg(target_os = "linux")]
fn clear_direct(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: plain fcntl calls on an open descriptor; they touch no user memory.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn clear_direct(_file: &File) -> io::Result<()> {
    Ok(())
}

/// Starts writeback of a range just written through the page cache, without waiting.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: a plain syscall on an open descriptor; it reads no user memory. Its result is
    // only advice: a failure (say, EINVAL on an unusual file system) is caught by the fsync.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// Allocates the blocks of a file about to be written in one go, `len` bytes, without changing
/// its size.
///
/// Otherwise ext4 reserves, maps and accounts each block as it is first written (delayed
/// allocation: `ext4_da_get_block_prep`, the extent-status tree, quota), about a tenth of the
/// CPU of a sustained sequential write, which writes a layer per checkpoint; preallocating
/// each layer gained 2.5–11 % on that job in two A/B runs (docs/PERFORMANCE.md). Advice
/// only: where the file system cannot preallocate, the blocks are allocated as written.
pub fn preallocate(file: &File, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(len) = libc::off_t::try_from(len) else {
            return;
        };
        // SAFETY: a plain syscall on an open descriptor; it touches no user memory.
        unsafe {
            libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, len);
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Blocks are allocated, the size (what readers and the layer check see) is unchanged.
    #[test]
    fn preallocate_allocates_without_growing_the_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        preallocate(&file, 8 << 20);
        let m = file.metadata().unwrap();
        assert_eq!(m.len(), 0);
        assert!(
            m.blocks() * 512 >= 8 << 20,
            "only {} blocks allocated",
            m.blocks()
        );
        preallocate(&file, 0); // nothing to allocate: no error to report, no panic
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    /// Whatever the sizes of head, data and writes (inside one block, across the head's
    /// block, across chunks, ending mid-block), the file holds exactly head then data.
    #[test]
    fn file_is_head_then_data_for_any_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(usize, &[usize])] = &[
            (0, &[]),
            (68, &[]),
            (68, &[1]),
            (100, &[4096 - 100]),
            (100, &[5000, 3]),
            (4096, &[4096]),
            (8000, &[512; 40]),
            (64, &[CHUNK_BYTES - 64, 1]),
            (300_000, &[CHUNK_BYTES + 4095, 700, CHUNK_BYTES]),
        ];
        for (i, (reserved, writes)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("f{i}"));
            let total: usize = writes.iter().sum();
            let mut f =
                BlobFile::create(&path, *reserved as u64, (reserved + total) as u64).unwrap();
            let mut want = pattern(*reserved, 0xa5);
            for (k, n) in writes.iter().enumerate() {
                let data = pattern(*n, k as u8);
                f.write_all(&data).unwrap();
                want.extend_from_slice(&data);
            }
            let size = f.finish(&want[..*reserved]).unwrap();
            assert_eq!(size, want.len() as u64, "case {i}");
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), want.len(), "case {i}: size");
            assert!(got == want, "case {i}: contents differ");
        }
    }

    /// Reused chunk buffers hold an earlier blob's bytes: none of them reach a new file (every
    /// byte is head, data or cut-off padding), and the pool keeps at most its bound.
    #[test]
    fn reused_buffers_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        // Poison more buffers than the pool keeps, then hand them back.
        let poisoned: Vec<AlignedBuf> = (0..POOLED_BUFFERS_MAX + 2)
            .map(|_| {
                let mut b = AlignedBuf::chunk(CHUNK_BYTES);
                b.fill(0xee);
                b
            })
            .collect();
        // Only chunk-sized buffers are pooled; others are sized to the granule.
        assert!(AlignedBuf::chunk(CHUNK_BYTES + 5)
            .len
            .is_multiple_of(POOLED_BUFFER_GRANULE));
        drop(poisoned);
        assert!(POOL.lock().unwrap().len() <= POOLED_BUFFERS_MAX);
        for (i, (reserved, data_len)) in [(100, 10), (5000, 3), (64, CHUNK_BYTES + 5)]
            .into_iter()
            .enumerate()
        {
            let path = dir.path().join(format!("f{i}"));
            let mut f = BlobFile::create(&path, reserved as u64, 0).unwrap();
            let data = pattern(data_len, 7);
            f.write_all(&data).unwrap();
            let mut want = pattern(reserved, 1);
            f.finish(&want).unwrap();
            want.extend_from_slice(&data);
            assert!(std::fs::read(&path).unwrap() == want, "case {i}");
        }
        assert!(POOL.lock().unwrap().len() <= POOLED_BUFFERS_MAX);
    }

    /// All layer writes together hold at most POOLED_BUFFERS_MAX chunk buffers, but a writer
    /// with none in flight always gets one (it would otherwise wait on itself), and one writer
    /// alone gets its whole window.
    #[test]
    fn layer_writes_share_one_buffer_budget() {
        assert!(may_allocate(0, POOLED_BUFFERS_MAX + 3), "progress first");
        assert!(!may_allocate(1, POOLED_BUFFERS_MAX), "the budget is shared");
        assert!(
            !may_allocate(WRITES_IN_FLIGHT_MAX, 1),
            "one window per writer"
        );
        // Alone: its current buffer and WRITES_IN_FLIGHT_MAX in flight.
        let mut in_flight = 0;
        while may_allocate(in_flight, 1 + in_flight) {
            in_flight += 1;
        }
        assert_eq!(1 + in_flight, POOLED_BUFFERS_MAX);
        // A second writer starting meanwhile takes one buffer and waits for its own after.
        assert!(may_allocate(0, POOLED_BUFFERS_MAX));
        assert!(!may_allocate(1, POOLED_BUFFERS_MAX + 1));
    }

    /// Filled in place a page at a time, as a layer is (pages of 512 bytes to 64 KiB, a head
    /// that leaves the buffer off the block grid), the file is the same as written whole.
    #[test]
    fn filling_in_place_by_pages_writes_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        for (i, (reserved, page, pages)) in [
            (68usize, 512usize, 40_000usize),
            (1_000, 4096, 5_000),
            (70_000, 65_536, 300),
            (4096, 4096, 2_049),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("f{i}"));
            let data = pattern(page * pages, i as u8);
            let mut f = BlobFile::create(&path, reserved as u64, 0).unwrap();
            let mut done = 0;
            while done < data.len() {
                let spare = f.spare(page).unwrap();
                assert!(!spare.is_empty() && spare.len().is_multiple_of(page));
                // Vary how much of the room is used: whole pages, never all of it.
                let n = (spare.len() / 2).max(page) / page * page;
                let n = n.min(data.len() - done);
                spare[..n].copy_from_slice(&data[done..done + n]);
                f.commit(n);
                done += n;
            }
            let head = pattern(reserved, 0x5a);
            assert_eq!(f.finish(&head).unwrap(), (reserved + data.len()) as u64);
            let got = std::fs::read(&path).unwrap();
            assert!(got[..reserved] == head[..], "case {i}: head");
            assert!(got[reserved..] == data[..], "case {i}: data");
        }
    }

    /// A write that fails on the writer thread (here ENOSPC, from /dev/full) comes back as
    /// the error of a later `write_all` or of `finish`, never as a silent success.
    #[test]
    fn a_failed_write_is_reported() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let mut f = BlobFile::create(full, 64, 0).unwrap();
        let chunk = vec![1u8; 1 << 20];
        let mut result = Ok(());
        for _ in 0..((3 * CHUNK_BYTES) >> 20) {
            result = f.write_all(&chunk);
            if result.is_err() {
                break;
            }
        }
        let result = result.and_then(|()| f.finish(&[0; 64]).map(drop));
        let e = result.expect_err("writes to /dev/full succeeded");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    }

    /// The head must be exactly what was reserved: a layer whose index came out another
    /// size than planned is an error, not a corrupt file.
    #[test]
    fn a_head_of_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = BlobFile::create(&dir.path().join("f"), 64, 0).unwrap();
        f.write_all(&[1; 10]).unwrap();
        assert!(f.finish(&[0; 63]).is_err());
    }

    /// A write direct I/O refuses (here: not block-aligned) is retried through the page
    /// cache, and the file stays buffered from then on.
    #[test]
    fn a_refused_direct_write_falls_back_to_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = BlobFile::create(&path, 64, 0).unwrap();
        if !f.is_direct() {
            return; // nothing to fall back from on this file system
        }
        let data = pattern(100, 1);
        write_at(&f.file, &mut f.direct, &data, 4096).unwrap();
        assert!(!f.is_direct());
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[4096..], &data[..]);
    }

    /// On this machine's file system (ext4 here) direct I/O is used; where it is refused
    /// the writes still land (the case above covers content either way).
    #[test]
    fn reports_whether_writes_bypass_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let f = BlobFile::create(&dir.path().join("f"), 64, 0).unwrap();
        let fs_type = std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(dir.path())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if fs_type.starts_with("ext") || fs_type == "xfs" || fs_type == "btrfs" {
            assert!(f.is_direct(), "{fs_type}: expected direct I/O");
        }
    }
}
