//! Write debt (DESIGN §7): how far an image's layers are from what a read and the store can
//! afford, and the compaction policy that pays it back — a pure function from the layer list
//! to the next merge. The arithmetic behind the numbers is in docs/FORMAT.md ("Compaction").
//!
//! Shape of an image's layers (oldest first, as in the manifest):
//! - the **base**: layers that map no page an older layer maps (judged by their spans, or by
//!   their pages when the caller knows them). They tile the image like one LSM level: a read
//!   consults at most one of them. A sequential fill lands here directly and is never merged
//!   just to lower a count.
//! - the **deltas**: every other layer (checkpoints of random writes, mostly). A read may have
//!   to consult each delta whose span covers its page.
//!
//! Policy ("leveled, one level, with tiered deltas"): deltas accumulate until their bytes
//! reach the bytes of the base they overlap (`BASE_MERGE_RATIO`), or there are more than
//! `DELTAS_MAX` of them, or the image stores more than `STORED_PER_LIVE_MAX` × its live
//! bytes; then all deltas and the base layers they overlap are merged into new base layers
//! of at most `BASE_PARTITION_BYTES` each (shadowed pages and tombstones drop out). Before
//! that, runs of `FANIN` deltas of one size tier are merged among themselves, which keeps
//! their count logarithmic in their bytes without rewriting the base.

use std::collections::BTreeMap;

/// Most deltas before every delta is merged into the base. A read consults at most this
/// many layers plus one base layer, once compaction has caught up.
pub const DELTAS_MAX: usize = 6;
/// The most layers a read of one page may have to consult once compaction has caught up.
pub const READ_DEPTH_MAX: usize = DELTAS_MAX + 1;
/// Past this read depth new writes are paced (delayed a little, more as depth grows).
pub const READ_DEPTH_SLOWDOWN: usize = 2 * READ_DEPTH_MAX;
/// Past this read depth new writes wait for compaction.
pub const READ_DEPTH_STOP: usize = 3 * READ_DEPTH_MAX;

/// Deltas are merged into the base once their bytes reach this many times the bytes of the
/// base layers they overlap: each base byte is then rewritten once per that many delta bytes
/// (write amplification of the base merge ≈ 1 / ratio).
pub const BASE_MERGE_RATIO: u64 = 1;
/// Stored bytes per live byte that compaction keeps to (plus `STORED_SLACK_BYTES`). Stored:
/// the bytes of every blob the newest manifest lists; live: the distinct data pages they hold.
pub const STORED_PER_LIVE_MAX: u64 = 3;
/// Past this many stored bytes per live byte (plus slack) writes are paced…
pub const STORED_PER_LIVE_SLOWDOWN: u64 = 4;
/// …and past this many they wait for compaction.
pub const STORED_PER_LIVE_STOP: u64 = 6;
/// Absolute slack on the stored/live limits, so that a nearly empty image (a few live pages
/// and the tombstones of a trim) does not count as deep in debt.
pub const STORED_SLACK_BYTES: u64 = 256 << 20;

/// Largest base layer a merge writes: the unit of rewriting when deltas touch a page range.
pub const BASE_PARTITION_BYTES: u64 = 256 << 20;
/// Base layers past this count are coalesced with their neighbours in page order (when the
/// pair fits in `BASE_PARTITION_BYTES`), so that slow sequential writes do not leave
/// thousands of small layers.
pub const BASE_LAYERS_COALESCE: usize = 32;

/// Deltas of one size tier merged together once this many are adjacent.
pub const FANIN: usize = 4;
/// Most deltas merged in one tiered step.
pub const RUN_MAX: usize = 8;
/// Size of the smallest tier's layers.
pub const TIER_BASE_BYTES: u64 = 4 << 20;

const _: () = assert!(FANIN >= 2 && RUN_MAX >= FANIN && FANIN <= DELTAS_MAX);
const _: () =
    assert!(READ_DEPTH_MAX < READ_DEPTH_SLOWDOWN && READ_DEPTH_SLOWDOWN < READ_DEPTH_STOP);
const _: () = assert!(
    STORED_PER_LIVE_MAX < STORED_PER_LIVE_SLOWDOWN
        && STORED_PER_LIVE_SLOWDOWN < STORED_PER_LIVE_STOP
);

/// The policy's numbers: `Policy::DEFAULT` holds the constants above; tests scale them down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub deltas_max: usize,
    pub base_merge_ratio: u64,
    pub stored_per_live_max: u64,
    pub stored_slack_bytes: u64,
    pub base_partition_bytes: u64,
    pub base_layers_coalesce: usize,
    pub tier_base_bytes: u64,
    pub read_depth_slowdown: usize,
    pub read_depth_stop: usize,
    pub stored_per_live_slowdown: u64,
    pub stored_per_live_stop: u64,
}

impl Policy {
    pub const DEFAULT: Policy = Policy {
        deltas_max: DELTAS_MAX,
        base_merge_ratio: BASE_MERGE_RATIO,
        stored_per_live_max: STORED_PER_LIVE_MAX,
        stored_slack_bytes: STORED_SLACK_BYTES,
        base_partition_bytes: BASE_PARTITION_BYTES,
        base_layers_coalesce: BASE_LAYERS_COALESCE,
        tier_base_bytes: TIER_BASE_BYTES,
        read_depth_slowdown: READ_DEPTH_SLOWDOWN,
        read_depth_stop: READ_DEPTH_STOP,
        stored_per_live_slowdown: STORED_PER_LIVE_SLOWDOWN,
        stored_per_live_stop: STORED_PER_LIVE_STOP,
    };

    /// How writes should be paced at debt `d`.
    pub fn pace(&self, d: &Debt) -> Pace {
        if d.read_depth > self.read_depth_stop || self.stored_past(d, self.stored_per_live_stop) {
            return Pace::Stop;
        }
        if d.read_depth > self.read_depth_slowdown
            || self.stored_past(d, self.stored_per_live_slowdown)
        {
            // Steeper as the stop comes closer: 1..=10 steps.
            let over = d.read_depth.saturating_sub(self.read_depth_slowdown) * 10
                / (self.read_depth_stop - self.read_depth_slowdown).max(1);
            return Pace::Slow(over.clamp(1, 10) as u32);
        }
        Pace::Free
    }

    /// Stored bytes are past `ratio` × live bytes + slack.
    pub fn stored_past(&self, d: &Debt, ratio: u64) -> bool {
        d.stored_bytes
            > d.live_bytes
                .saturating_mul(ratio)
                .saturating_add(self.stored_slack_bytes)
    }

    /// The most layers the manifest lists once compaction has caught up, for base layers
    /// spanning `span_bytes`: the deltas, plus base layers of which any two neighbours hold
    /// more than a partition (or the coalescing floor).
    pub fn layers_limit(&self, span_bytes: u64) -> usize {
        let partitions = (span_bytes / self.base_partition_bytes) as usize;
        self.deltas_max + self.base_layers_coalesce.max(2 * partitions + 1)
    }
}

/// What the policy needs to know of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// First page the layer maps (data or tombstone)…
    pub first: u64,
    /// …and one past the last (`first == end`: the layer maps nothing).
    pub end: u64,
    /// Data pages it holds.
    pub data_pages: u64,
    /// Size of its blob.
    pub bytes: u64,
    /// Known to map no page that an older layer maps (even if the spans overlap: a
    /// sequential writer with several requests in flight leaves neighbouring checkpoints
    /// interleaved at their edges). False: judge by the spans.
    pub pages_disjoint: bool,
}

impl Shape {
    fn overlaps(&self, o: &Shape) -> bool {
        self.first < o.end && o.first < self.end
    }
}

/// The next compaction step. Indexes are into the layer list, oldest first; a merge's output
/// takes the place of its oldest input, the other inputs leave the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No data copied: list the base layers first, then the deltas (each group in its order).
    /// A layer disjoint from everything older may move below layers it does not overlap.
    Sink { order: Vec<usize> },
    /// Merge these layers into base layers of at most `base_partition_bytes`, never
    /// spanning one of `fences` (the first pages of the base layers left out). Every layer
    /// holding a page of the inputs is an input: tombstones drop out.
    IntoBase {
        inputs: Vec<usize>,
        fences: Vec<u64>,
    },
    /// Merge adjacent deltas `[start, end)` into one delta (tombstones kept).
    Deltas { start: usize, end: usize },
    /// Merge two base layers adjacent in page order into one base layer.
    Coalesce { inputs: Vec<usize> },
}

impl Step {
    /// The layers the step reads, oldest first (none for `Sink`).
    pub fn inputs(&self) -> Vec<usize> {
        match self {
            Step::Sink { .. } => Vec::new(),
            Step::IntoBase { inputs, .. } | Step::Coalesce { inputs } => inputs.clone(),
            Step::Deltas { start, end } => (*start..*end).collect(),
        }
    }

    /// Nothing older than the inputs holds their pages: tombstones can go.
    pub fn at_bottom(&self) -> bool {
        matches!(self, Step::IntoBase { .. } | Step::Coalesce { .. })
    }

    /// The first pages of layers the merged output must not span.
    pub fn fences(&self) -> &[u64] {
        match self {
            Step::IntoBase { fences, .. } => fences,
            _ => &[],
        }
    }

    /// `list` (the layers the step was planned on, oldest first, then any appended since)
    /// after the step: the outputs take the oldest input's place, the other inputs go.
    pub fn apply<T: Clone>(&self, list: &[T], outputs: Vec<T>) -> Vec<T> {
        if let Step::Sink { order } = self {
            let mut out: Vec<T> = order.iter().map(|&i| list[i].clone()).collect();
            out.extend_from_slice(&list[order.len()..]);
            return out;
        }
        let inputs = self.inputs();
        let mut out = Vec::with_capacity(list.len() + outputs.len());
        let mut outputs = Some(outputs);
        for (i, l) in list.iter().enumerate() {
            if inputs.first() == Some(&i) {
                out.extend(outputs.take().into_iter().flatten());
            } else if !inputs.contains(&i) {
                out.push(l.clone());
            }
        }
        out
    }
}

/// Where a merge's output starts a new layer: given its extents in page order (start, pages,
/// is data), the pages at which a new layer begins so that none holds more than
/// `max_data_pages` data pages or spans one of `fences` (sorted). The first layer begins at
/// the first extent and is not listed.
pub fn cut_points(extents: &[(u64, u64, bool)], fences: &[u64], max_data_pages: u64) -> Vec<u64> {
    let mut cuts = Vec::new();
    let Some(&(first, _, _)) = extents.first() else {
        return cuts;
    };
    let (mut start, mut data) = (first, 0u64);
    let mut fence = fences.partition_point(|&f| f <= first);
    for &(s, len, is_data) in extents {
        // A fence between the current layer's start and this extent: begin anew here.
        if fences.get(fence).is_some_and(|&f| f <= s) {
            fence = fences.partition_point(|&f| f <= s);
            if s > start {
                cuts.push(s);
                (start, data) = (s, 0);
            }
        }
        if !is_data {
            continue;
        }
        let mut at = s;
        let end = s + len;
        while data + (end - at) > max_data_pages {
            let cut = at + (max_data_pages - data);
            if cut > start {
                cuts.push(cut);
            }
            (start, data, at) = (cut, 0, cut);
        }
        data += end - at;
    }
    cuts
}

/// How deep in debt an image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Debt {
    pub layers: usize,
    pub deltas: usize,
    /// Most layers whose span covers one page.
    pub read_depth: usize,
    pub stored_bytes: u64,
    pub live_bytes: u64,
}

impl Debt {
    pub fn measure(layers: &[Shape], live_bytes: u64) -> Debt {
        Debt {
            layers: layers.len(),
            deltas: split(layers).1.len(),
            read_depth: read_depth(layers),
            stored_bytes: layers.iter().map(|l| l.bytes).sum(),
            live_bytes,
        }
    }

    /// Why writes are paced, for the log.
    pub fn cause(&self) -> String {
        format!(
            "{} layers ({} deltas), read depth {} (limit {READ_DEPTH_MAX}), {} MiB stored \
             for {} MiB live",
            self.layers,
            self.deltas,
            self.read_depth,
            self.stored_bytes >> 20,
            self.live_bytes >> 20
        )
    }
}

/// Write pacing for compaction debt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    Free,
    /// Delay each write by this many steps.
    Slow(u32),
    /// Wait for compaction.
    Stop,
}

/// Indexes of the base layers and of the deltas, each oldest first.
pub fn split(layers: &[Shape]) -> (Vec<usize>, Vec<usize>) {
    let mut seen = Spans::default();
    let (mut base, mut deltas) = (Vec::new(), Vec::new());
    for (i, l) in layers.iter().enumerate() {
        if l.pages_disjoint || !seen.intersects(l.first, l.end) {
            base.push(i);
        } else {
            deltas.push(i);
        }
        seen.add(l.first, l.end);
    }
    (base, deltas)
}

/// The most layers a read of one page may consult: base layers share no page, so at most
/// one of them, plus every delta whose span covers the page.
pub fn read_depth(layers: &[Shape]) -> usize {
    let (base, deltas) = split(layers);
    let deltas: Vec<Shape> = deltas.iter().map(|&d| layers[d]).collect();
    spans_depth(&deltas) + usize::from(!base.is_empty())
}

/// The most of `layers` whose spans cover one page.
fn spans_depth(layers: &[Shape]) -> usize {
    let mut edges: Vec<(u64, i64)> = Vec::with_capacity(layers.len() * 2);
    for l in layers.iter().filter(|l| l.end > l.first) {
        edges.push((l.first, 1));
        edges.push((l.end, -1));
    }
    // Ends before starts at the same page: spans are half-open.
    edges.sort_unstable();
    let (mut depth, mut most) = (0i64, 0i64);
    for (_, d) in edges {
        depth += d;
        most = most.max(depth);
    }
    most as usize
}

/// Size tier of a layer: 0 below TIER_BASE_BYTES of data, then one tier per factor of 4.
pub fn tier(l: &Shape, page_size_bits: u32, tier_base_bytes: u64) -> u32 {
    let units = (l.data_pages << page_size_bits) / tier_base_bytes;
    if units == 0 {
        0
    } else {
        1 + (63 - units.leading_zeros()) / 2
    }
}

/// The next step that lowers the debt of `layers` (oldest first), if any is due.
pub fn plan(p: &Policy, layers: &[Shape], live_bytes: u64, page_size_bits: u32) -> Option<Step> {
    let (base, deltas) = split(layers);
    if base.iter().zip(0..).any(|(&b, i)| b != i) {
        let order = base.iter().chain(&deltas).copied().collect();
        return Some(Step::Sink { order });
    }
    if !deltas.is_empty() {
        let overlapped: Vec<usize> = base
            .iter()
            .copied()
            .filter(|&b| deltas.iter().any(|&d| layers[d].overlaps(&layers[b])))
            .collect();
        let bytes = |ix: &[usize]| ix.iter().map(|&i| layers[i].bytes).sum::<u64>();
        let debt = Debt::measure(layers, live_bytes);
        if deltas.len() > p.deltas_max
            || bytes(&deltas) >= bytes(&overlapped).saturating_mul(p.base_merge_ratio)
            || p.stored_past(&debt, p.stored_per_live_max)
        {
            let mut fences: Vec<u64> = base
                .iter()
                .filter(|b| !overlapped.contains(b))
                .map(|&b| layers[b].first)
                .collect();
            fences.sort_unstable();
            let inputs = overlapped.into_iter().chain(deltas).collect();
            return Some(Step::IntoBase { inputs, fences });
        }
        let shapes: Vec<Shape> = deltas.iter().map(|&d| layers[d]).collect();
        if let Some((s, e)) = pick_tier_run(&shapes, |l| tier(l, page_size_bits, p.tier_base_bytes))
        {
            return Some(Step::Deltas {
                start: deltas[s],
                end: deltas[e - 1] + 1,
            });
        }
    }
    if base.len() > p.base_layers_coalesce {
        let mut by_page: Vec<usize> = base.clone();
        by_page.sort_by_key(|&i| layers[i].first);
        let best = by_page
            .windows(2)
            .map(|w| (layers[w[0]].bytes + layers[w[1]].bytes, w))
            .filter(|(sum, _)| *sum <= p.base_partition_bytes)
            .min_by_key(|(sum, _)| *sum);
        if let Some((_, w)) = best {
            let mut inputs = w.to_vec();
            inputs.sort_unstable();
            return Some(Step::Coalesce { inputs });
        }
    }
    None
}

/// The oldest part of the newest run of at least FANIN layers sharing a size tier, as
/// `[start, end)` into `layers`.
pub fn pick_tier_run(layers: &[Shape], tier: impl Fn(&Shape) -> u32) -> Option<(usize, usize)> {
    let mut end = layers.len();
    while end > 0 {
        let t = tier(&layers[end - 1]);
        let mut start = end - 1;
        while start > 0 && tier(&layers[start - 1]) == t {
            start -= 1;
        }
        if end - start >= FANIN {
            return Some((start, end.min(start + RUN_MAX)));
        }
        end = start;
    }
    None
}

/// A set of page ranges, kept as disjoint, non-adjacent `start → end` entries.
#[derive(Debug, Default, Clone)]
pub struct Spans(BTreeMap<u64, u64>);

impl Spans {
    /// Some page of `[start, end)` is in the set.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        // The last range starting before `end` is the only one that can reach into it.
        self.0
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    /// Every page of `[start, end)` is in the set.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        self.0
            .range(..=start)
            .next_back()
            .is_some_and(|(_, &e)| e >= end)
    }

    /// The parts of `[start, end)` not in the set, in order.
    pub fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        let first = self.0.range(..=start).next_back().map(|(&s, _)| s);
        for (&s, &e) in self.0.range(first.unwrap_or(start)..end) {
            if e <= at {
                continue;
            }
            if s > at {
                out.push((at, s.min(end)));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Adds `[start, end)`, merging what it touches.
    pub fn add(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.0.remove(&s);
            }
        }
        let inside: Vec<(u64, u64)> = self.0.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            end = end.max(e);
            self.0.remove(&s);
        }
        self.0.insert(start, end);
    }

    pub fn ranges(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests;
