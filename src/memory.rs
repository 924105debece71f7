//! The allocator's share of the server's memory (the RSS budget in docs/PERFORMANCE.md).
//!
//! glibc gives each thread that allocates concurrently an arena of its own, up to 8 per core,
//! and an arena keeps what was freed in it. The server's large, short-lived allocations
//! (a checkpoint's snapshot of the buffer index, a merge's extent map) come from whichever
//! thread does the work, so without a cap every arena ends up holding its own high-water
//! mark. Few arenas, and returning freed memory after the big jobs, keep RSS near what is
//! live.

/// Most malloc arenas: connection threads serve small requests (lock contention in the
/// allocator is not what limits them), and every arena keeps its peak.
pub const MALLOC_ARENAS_MAX: i32 = 4;

/// Allocations of at least this many bytes get pages of their own from the kernel and give
/// them back when freed. glibc's default threshold rises with each such block freed (up to
/// 32 MiB), after which the large, short-lived buffers of checkpoints and merges (layer chunk
/// buffers, snapshots, extent lists) were carved from the heap and stayed there as the RSS
/// peak; a fixed threshold keeps them out of it.
pub const MMAP_THRESHOLD_BYTES: i32 = 1 << 20;

/// Caps the allocator's arenas and fixes its mmap threshold; call before threads start.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS_MAX);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
}

/// Gives memory freed by a large job back to the system (a checkpoint's snapshot, a merge).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heaps to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Calls `release_freed` when dropped. As the last field of a struct it runs after every
/// other field is freed (fields drop in declaration order): a closed session's indexes go
/// back to the system, not only to the allocator.
pub struct ReleaseOnDrop;

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_freed();
    }
}
