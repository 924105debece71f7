//! Early writeback for files written in one go and fsynced at the end (layer blobs).
//!
//! Without it a layer's pages sit dirty in the page cache until its final `fsync`, so the
//! disk idles while the layer is being written and the writer idles while the disk works.
//! Asking the kernel to start writing each chunk as soon as it is written
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for completion) overlaps
//! the two; the final `fsync` stays the durability point, so nothing here affects
//! correctness — on systems without the call it is a no-op.

use std::fs::File;

/// Bytes written before a range is handed to the kernel for writeback.
pub const WRITEBACK_CHUNK_BYTES: u64 = 8 << 20;

/// Tracks how far a sequentially written file has been handed to writeback.
pub struct Writeback<'f> {
    file: &'f File,
    started_to: u64,
}

impl<'f> Writeback<'f> {
    pub fn new(file: &'f File, from: u64) -> Writeback<'f> {
        Writeback {
            file,
            started_to: from,
        }
    }

    /// The file's bytes below `written_to` are written (not buffered in user space): start
    /// writeback of them once a chunk's worth has accumulated.
    pub fn written(&mut self, written_to: u64) {
        if written_to >= self.started_to + WRITEBACK_CHUNK_BYTES {
            start(self.file, self.started_to, written_to - self.started_to);
            self.started_to = written_to;
        }
    }
}

#[cfg(target_os = "linux")]
fn start(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    const SYNC_FILE_RANGE_WRITE: u32 = 2;
    extern "C" {
        fn sync_file_range(fd: i32, offset: i64, nbytes: i64, flags: u32) -> i32;
    }
    // SAFETY: a plain syscall on an open descriptor; it reads no user memory. Its result is
    // only advice: a failure (say, EINVAL on an unusual file system) is caught by the fsync.
    unsafe {
        sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start(_file: &File, _offset: u64, _len: u64) {}
