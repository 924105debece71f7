//! Sequential-stream detection: the one rule behind the block cache's readahead (streams of
//! one blob, in blocks: `store::cache`) and the scan hint (streams of one image, in pages:
//! `engine::scan`). Each keeps a few streams, each with its frontier (the furthest unit
//! read) and its streak (reads that moved the frontier forward, in a row); what a stream
//! fetches ahead is the caller's business.

/// A read continues a stream if it starts at most this many of its own lengths past the
/// stream's frontier (concurrent readers arrive a little out of order, and a stream of one
/// layer skips the pages newer layers shadow), within
/// [`SEQUENTIAL_GAP_BYTES_MIN`]..=[`SEQUENTIAL_GAP_BYTES_MAX`]. Small, so that random reads
/// seldom look like a stream: 4 KiB reads continue one only within 64 KiB...
pub const SEQUENTIAL_GAP_READS: u64 = 8;
pub const SEQUENTIAL_GAP_BYTES_MIN: u64 = 64 << 10;
pub const SEQUENTIAL_GAP_BYTES_MAX: u64 = 2 << 20;

/// ...or at most this far behind it (concurrent readers of one stream arrive out of order:
/// nbdcopy keeps 64 reads of 256 KiB in flight per connection). Such a read belongs to the
/// stream without moving it.
pub const SEQUENTIAL_BEHIND_BYTES: u64 = 16 << 20;

/// Streams tracked at once (an NBD client copying an image with several connections reads
/// several regions at once); the least recently used is replaced.
pub const STREAMS_MAX: usize = 4;

/// The streams of one blob or image, each with the caller's state `T`.
pub struct Streams<T> {
    streams: Vec<Stream<T>>,
    /// Counts reads: a stream's `used` is the count at its last read.
    clock: u64,
}

pub struct Stream<T> {
    /// Furthest unit read.
    pub frontier: u64,
    /// Reads that moved the frontier forward, in a row.
    pub streak: u32,
    used: u64,
    pub state: T,
}

/// A read that continued a stream.
pub struct Followed<'a, T> {
    pub stream: &'a mut Stream<T>,
    /// The frontier before the read, if the read moved it forward.
    pub advanced_from: Option<u64>,
}

impl<T> Default for Streams<T> {
    fn default() -> Streams<T> {
        Streams {
            streams: Vec::new(),
            clock: 0,
        }
    }
}

impl<T> Streams<T> {
    pub fn iter(&self) -> impl Iterator<Item = &Stream<T>> {
        self.streams.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Stream<T>> {
        self.streams.iter_mut()
    }

    /// Notes a read of units `[first, last]` (of `unit_bytes` each). A read that starts
    /// within the gap past a stream's frontier, or within [`SEQUENTIAL_BEHIND_BYTES`] behind
    /// it, follows that stream: it extends the streak if it moves the frontier forward, and
    /// shortens it if it lies further behind than the gap (random reads land behind a
    /// frontier more often than just ahead of it, and so never build a streak). A read near
    /// no stream starts one (state `fresh()`) and returns `None`.
    pub fn follows(
        &mut self,
        first: u64,
        last: u64,
        unit_bytes: u64,
        fresh: impl FnOnce() -> T,
    ) -> Option<Followed<'_, T>> {
        self.clock += 1;
        let now = self.clock;
        let gap = (SEQUENTIAL_GAP_READS * (last - first + 1)).clamp(
            SEQUENTIAL_GAP_BYTES_MIN / unit_bytes,
            SEQUENTIAL_GAP_BYTES_MAX / unit_bytes,
        );
        let behind = SEQUENTIAL_BEHIND_BYTES / unit_bytes;
        let near = |f: u64| first <= f + 1 + gap && first + behind >= f;
        let Some(i) = self.streams.iter().position(|s| near(s.frontier)) else {
            let stream = Stream {
                frontier: last,
                streak: 1,
                used: now,
                state: fresh(),
            };
            if self.streams.len() < STREAMS_MAX {
                self.streams.push(stream);
            } else if let Some(s) = self.streams.iter_mut().min_by_key(|s| s.used) {
                *s = stream;
            }
            return None;
        };
        let s = &mut self.streams[i];
        s.used = now;
        let mut advanced_from = None;
        if last > s.frontier {
            s.streak = s.streak.saturating_add(1);
            advanced_from = Some(s.frontier);
            s.frontier = last;
        } else if first + gap < s.frontier {
            s.streak = s.streak.saturating_sub(1);
        }
        Some(Followed {
            stream: s,
            advanced_from,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_order_build_a_streak_and_random_ones_do_not() {
        let mut s: Streams<()> = Streams::default();
        // 64 KiB units: the gap is 8 reads of one unit, at least 1, at most 32 units.
        let unit = 64 << 10;
        assert!(s.follows(0, 0, unit, || ()).is_none());
        for i in 1..5 {
            let f = s.follows(i, i, unit, || ()).unwrap();
            assert_eq!(
                (f.stream.streak, f.advanced_from),
                (i as u32 + 1, Some(i - 1))
            );
        }
        // Late, within reach behind: the stream's, without moving it.
        let f = s.follows(2, 2, unit, || ()).unwrap();
        assert_eq!((f.stream.frontier, f.advanced_from), (4, None));
        assert_eq!(f.stream.streak, 5);
        // Past the gap: a new stream.
        assert!(s.follows(4 + 2 + 8, 4 + 2 + 8, unit, || ()).is_none());
        assert_eq!(s.iter().count(), 2);
        // At most STREAMS_MAX, the least recently used replaced.
        for k in 1..=STREAMS_MAX as u64 {
            assert!(s.follows(k * 10_000, k * 10_000, unit, || ()).is_none());
        }
        assert_eq!(s.iter().count(), STREAMS_MAX);
        assert!(s.iter().all(|st| st.frontier >= 10_000));
    }
}
