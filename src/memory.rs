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

/// Caps the allocator's arenas; call before threads start.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS_MAX);
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
