//! Compaction (DESIGN §7): merges runs of adjacent layers of the same size tier into one
//! layer, so the layer count — and the cost of a read that misses the buffer — grows only
//! logarithmically with the data written, however many checkpoints there are.
//!
//! Tiers: a layer with `b` bytes of page data is in tier 0 if `b < TIER_BASE_BYTES`, else in
//! tier `1 + floor(log4(b / TIER_BASE_BYTES))`. When `FANIN` or more adjacent layers share a
//! tier, up to `RUN_MAX` of them (the oldest of the run) are merged: newer extents shadow
//! older ones, and zero extents (tombstones) are dropped when the run starts at the bottom
//! layer, where nothing older remains beneath them. The merged layer replaces the run in
//! manifest g+1 (conditional create, like a checkpoint); the old blobs become garbage for
//! `mvps-s3-gc`.

use super::extent::{ExtentMap, ExtentValue};
use super::layer::{Layer, LayerVal, SourceExtent};
use super::manifest::{LayerRef, Manifest};
use super::open::{now_unix, open_layer};
use super::session::Session;
use super::Result;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Layers merged once this many adjacent ones share a size tier.
pub const FANIN: usize = 4;
/// Most layers merged in one step (bounds one compaction's work).
pub const RUN_MAX: usize = 8;
/// Size of the smallest tier's layers.
pub const TIER_BASE_BYTES: u64 = 4 << 20;
/// Merges per compaction pass (a pass runs after each checkpoint).
pub const STEPS_PER_PASS_MAX: usize = 4;
/// While writes keep the checkpoints busy, compaction waits (it competes with them for CPU
/// and disk, and merging layers that are about to be shadowed is wasted work), unless the
/// image has more layers than this: then read cost comes first.
pub const LAYERS_DEFER_MAX: usize = 24;
/// How long write pressure outlives the checkpoint that saw it. Each checkpoint empties the
/// buffer, so "the buffer is full" alone reads false right after one, and a merge (seconds
/// of reading and writing layers) would start in the middle of sustained writes; checkpoints
/// under such writes follow each other well within this.
pub const WRITE_PRESSURE_HOLD_MS: u64 = 5_000;

/// Most layer extents a pass looks at, newest layers first, to find layers that newer ones
/// cover entirely (`drop_shadowed`). The scan is in memory but runs after every checkpoint;
/// layers of large writes have few extents, and those are the ones it finds.
pub const SHADOW_SCAN_EXTENTS_MAX: usize = 1 << 16;

const _: () = assert!(FANIN >= 2 && RUN_MAX >= FANIN);

pub fn tier(l: &LayerRef, page_size_bits: u32) -> u32 {
    let units = (l.data_pages << page_size_bits) / TIER_BASE_BYTES;
    if units == 0 {
        0
    } else {
        1 + (63 - units.leading_zeros()) / 2
    }
}

/// The run to merge, as `[start, end)` indexes into `layers` (oldest first), if any.
pub fn pick_run(layers: &[LayerRef], page_size_bits: u32) -> Option<(usize, usize)> {
    let mut end = layers.len();
    while end > 0 {
        let t = tier(&layers[end - 1], page_size_bits);
        let mut start = end - 1;
        while start > 0 && tier(&layers[start - 1], page_size_bits) == t {
            start -= 1;
        }
        if end - start >= FANIN {
            return Some((start, end.min(start + RUN_MAX)));
        }
        end = start;
    }
    None
}

/// A merged page run: from source layer `.0` (index in the run) at `.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Src(usize, LayerVal);

impl ExtentValue for Src {
    fn advance(&self, pages: u64) -> Self {
        Src(self.0, self.1.advance(pages))
    }
}

/// Backoff after a failed compaction.
const RETRY_DELAY_MS: u64 = 5_000;
/// Longest the compaction thread sleeps without being woken by a checkpoint.
const IDLE_WAIT_MS: u64 = 60_000;
/// How soon a deferred compaction looks again (checkpoints also wake it).
const DEFER_RECHECK_MS: u64 = 1_000;

/// What a compaction pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Nothing (more) to merge, or the session stopped.
    Done,
    /// Merges are due but wait for write pressure to ease.
    Deferred,
}

/// Starts the session's compaction thread: it runs a pass whenever a checkpoint wakes it.
pub fn start_thread(s: &Arc<Session>) {
    let weak = Arc::downgrade(s);
    let what = format!("image {}: compaction thread", s.image_id);
    let h = std::thread::Builder::new()
        .name(format!("compact-{}", s.image_id))
        .spawn(move || super::exit_on_panic(&what, || run(weak)))
        .expect("spawn compaction thread");
    *s.compaction_thread.lock().unwrap() = Some(h);
}

fn run(weak: std::sync::Weak<Session>) {
    // Merges due when the session opened run after its first checkpoint, or when its last
    // client leaves (the idle session compacts before it closes).
    let mut delay = IDLE_WAIT_MS;
    loop {
        let Some(s) = weak.upgrade() else { return };
        {
            let (m, c) = &s.compact_wake;
            let mut woken = m.lock().unwrap();
            if !*woken {
                woken = c
                    .wait_timeout(woken, Duration::from_millis(delay))
                    .unwrap()
                    .0;
            }
            *woken = false;
        }
        if s.is_stopped() {
            return;
        }
        delay = match s.compact() {
            Ok(Pass::Done) => IDLE_WAIT_MS,
            Ok(Pass::Deferred) => DEFER_RECHECK_MS,
            Err(e) => {
                s.compaction_failing.store(true, Ordering::Release);
                log::error!("{e} (compaction failed; will retry)");
                RETRY_DELAY_MS
            }
        };
        if s.connection_count() == 0 {
            // An idle session closes once checkpointed and compacted: tell the checkpoint
            // thread, which closes it.
            s.wake_checkpoint();
        }
    }
}

impl Session {
    /// Merges layer runs until none qualifies (at most STEPS_PER_PASS_MAX merges), unless
    /// write pressure defers them (see LAYERS_DEFER_MAX).
    pub fn compact(&self) -> Result<Pass> {
        // Free (no data is read or written), so not deferred by write pressure.
        self.drop_shadowed()?;
        for _ in 0..STEPS_PER_PASS_MAX {
            if self.is_stopped() {
                break;
            }
            if self.compaction_deferred() {
                return Ok(Pass::Deferred);
            }
            if !self.compact_step()? {
                break;
            }
        }
        self.compaction_failing.store(false, Ordering::Release);
        Ok(Pass::Done)
    }

    /// Some run of layers qualifies for a merge.
    pub fn compaction_pending(&self) -> bool {
        let w = self.writer.lock().unwrap();
        w.manifest
            .as_ref()
            .is_some_and(|m| pick_run(&m.layers, self.page_size_bits).is_some())
    }

    /// The last compaction failed (the image store is failing): an idle session may close
    /// without waiting for it.
    pub fn compaction_failing(&self) -> bool {
        self.compaction_failing.load(Ordering::Acquire)
    }

    /// Write pressure: clients are connected, and the buffer holds over a quarter of the
    /// throttle threshold or a checkpoint moved that much within the last
    /// `write_pressure_hold_ms`, so checkpoints are busy draining it. Merges wait then,
    /// unless the layer count passed LAYERS_DEFER_MAX.
    fn compaction_deferred(&self) -> bool {
        if self.connection_count() == 0 {
            return false;
        }
        let hold = Duration::from_millis(self.buffer.cfg.write_pressure_hold_ms);
        let recent = self
            .pressured_at
            .lock()
            .unwrap()
            .is_some_and(|at| at.elapsed() < hold);
        if !recent && !self.under_write_pressure(self.buffered_pages()) {
            return false;
        }
        let layers = self.view.read().unwrap().layers.len();
        layers <= LAYERS_DEFER_MAX
    }

    /// `pages` buffered (or just checkpointed) are over a quarter of the throttle threshold.
    pub(super) fn under_write_pressure(&self, pages: u64) -> bool {
        pages > self.buffer.cfg.write_throttle_threshold_pages / 4
    }

    /// One merge. Returns false when there was nothing to merge.
    fn compact_step(&self) -> Result<bool> {
        self.check_usable()?;
        let (run_layers, run_ids, at_bottom) = {
            let w = self.writer.lock().unwrap();
            let Some(m) = w.manifest.as_ref() else {
                return Ok(false);
            };
            let Some((start, end)) = pick_run(&m.layers, self.page_size_bits) else {
                return Ok(false);
            };
            let view = self.view.read().unwrap();
            // The view holds the same layers newest first.
            let n = m.layers.len();
            let picked: Vec<Arc<Layer>> = (start..end)
                .map(|i| view.layers[n - 1 - i].clone())
                .collect();
            let ids: Vec<String> = m.layers[start..end]
                .iter()
                .map(|l| l.blob_id.clone())
                .collect();
            for (l, id) in picked.iter().zip(&ids) {
                assert_eq!(&l.blob_id, id, "view and manifest list the same layers");
            }
            (picked, ids, start == 0)
        };
        // The slow part, with no lock held: checkpoints go on meanwhile.
        let merged_ref = self.merge(&run_layers, at_bottom)?;
        let opened = match &merged_ref {
            Some(r) => Some(Arc::new(open_layer(
                &self.buffer,
                &self.image_id,
                &r.blob_id,
            )?)),
            None => None,
        };
        let _publishing = self.manifest_lock.lock().unwrap();
        let Some(base) = self.writer.lock().unwrap().manifest.clone() else {
            return Ok(false);
        };
        // Checkpoints only append layers, so the run is still where it was; check anyway.
        let Some(start) = base.layers.iter().position(|l| l.blob_id == run_ids[0]) else {
            return Ok(false);
        };
        let end = start + run_ids.len();
        if base
            .layers
            .get(start..end)
            .is_none_or(|r| r.iter().zip(&run_ids).any(|(a, b)| &a.blob_id != b))
        {
            return Ok(false);
        }
        let mut next = base.clone();
        next.generation += 1;
        next.created_at_unix = now_unix();
        let tail = next.layers.split_off(end);
        next.layers.truncate(start);
        next.layers.extend(merged_ref.iter().cloned());
        next.layers.extend(tail);
        self.publish(&next)?;
        self.install_compacted(&base, &next, opened);
        log::info!(
            "image {}: compaction: merged {} layers into {}, manifest generation {}",
            self.image_id,
            end - start,
            if merged_ref.is_some() {
                "1"
            } else {
                "none (all tombstones)"
            },
            next.generation
        );
        Ok(true)
    }

    /// Takes out of the manifest every layer whose pages newer layers all cover: no read can
    /// reach it any more (a whole-image rewrite, say, leaves every older layer dead), so it
    /// goes without being merged — no data is copied. Returns how many layers went.
    pub fn drop_shadowed(&self) -> Result<usize> {
        self.check_usable()?;
        let (ids, layers) = {
            let w = self.writer.lock().unwrap();
            let Some(m) = w.manifest.as_ref() else {
                return Ok(0);
            };
            let view = self.view.read().unwrap();
            let ids: Vec<String> = m.layers.iter().rev().map(|l| l.blob_id.clone()).collect();
            (ids, view.layers.clone())
        };
        // Both newest first.
        debug_assert!(ids.iter().zip(&layers).all(|(id, l)| id == &l.blob_id));
        let shadowed = shadowed_layers(&layers, SHADOW_SCAN_EXTENTS_MAX);
        if shadowed.is_empty() {
            return Ok(0);
        }
        let _publishing = self.manifest_lock.lock().unwrap();
        let Some(base) = self.writer.lock().unwrap().manifest.clone() else {
            return Ok(0);
        };
        // Still shadowed if still listed: checkpoints only add newer layers (more cover), and
        // a merge since the scan either took a shadowed layer into its run (then it is no
        // longer listed, and we stop) or merged only layers above it — a run with a layer
        // below it is not at the bottom, so the merged layer maps every page its run did.
        let gone: std::collections::HashSet<&str> =
            shadowed.iter().map(|&i| ids[i].as_str()).collect();
        let listed = base
            .layers
            .iter()
            .filter(|l| gone.contains(l.blob_id.as_str()))
            .count();
        if listed != gone.len() {
            return Ok(0);
        }
        let mut next = base.clone();
        next.generation += 1;
        next.created_at_unix = now_unix();
        next.layers.retain(|l| !gone.contains(l.blob_id.as_str()));
        self.publish(&next)?;
        self.install_compacted(&base, &next, None);
        log::info!(
            "image {}: compaction: dropped {} layer(s) that newer layers cover, manifest \
             generation {}",
            self.image_id,
            gone.len(),
            next.generation
        );
        Ok(gone.len())
    }

    /// Writes the merge of `run` (oldest first) as one layer; None if nothing remains.
    fn merge(&self, run: &[Arc<Layer>], at_bottom: bool) -> Result<Option<LayerRef>> {
        let mut map: ExtentMap<Src> = ExtentMap::new();
        for (i, layer) in run.iter().enumerate() {
            for e in layer.index.iter() {
                map.insert(e.start, e.len, Src(i, e.value));
            }
        }
        if at_bottom {
            map.retain(|v| v.1 != LayerVal::Zero);
        }
        if map.is_empty() {
            return Ok(None);
        }
        let extents: Vec<_> = map.iter().collect();
        let sources: Vec<SourceExtent> = extents
            .iter()
            .map(|e| match e.value.1 {
                LayerVal::Zero => SourceExtent::Zero {
                    start: e.start,
                    len: e.len,
                },
                LayerVal::Data(_) => SourceExtent::Data {
                    start: e.start,
                    len: e.len,
                },
            })
            .collect();
        let mut next = 0;
        // Pages are copied after their checksums are verified, so those checksums carry over.
        let r = self.write_and_upload(&sources, |start, _n, buf, crcs| {
            while extents[next].end() <= start {
                next += 1;
            }
            let e = &extents[next];
            let Src(i, LayerVal::Data(page)) = e.value.advance(start - e.start) else {
                unreachable!("only data extents are read");
            };
            run[i]
                .read_data_with_crcs(page, buf, crcs)
                .map_err(std::io::Error::other)
        })?;
        Ok(Some(r))
    }

    /// Swaps the merged run for the new layer in the read view and records the manifest.
    fn install_compacted(&self, base: &Manifest, next: &Manifest, merged: Option<Arc<Layer>>) {
        let mut w = self.writer.lock().unwrap();
        let mut view = self.view.write().unwrap();
        let mut by_id: std::collections::HashMap<String, Arc<Layer>> = view
            .layers
            .iter()
            .map(|l| (l.blob_id.clone(), l.clone()))
            .collect();
        if let Some(m) = merged {
            by_id.insert(m.blob_id.clone(), m);
        }
        debug_assert_eq!(
            w.manifest.as_ref().map(|m| m.generation),
            Some(base.generation)
        );
        view.layers = next
            .layers
            .iter()
            .rev()
            .map(|r| by_id[&r.blob_id].clone())
            .collect();
        w.manifest = Some(next.clone());
    }
}

/// Indexes (into `layers`, newest first) of the layers whose every page a newer layer maps,
/// looking at no more than `budget` extents (older layers past it are not checked).
fn shadowed_layers(layers: &[Arc<Layer>], mut budget: usize) -> Vec<usize> {
    // The pages mapped by the layers seen so far, as disjoint, non-adjacent ranges
    // (start → end).
    let mut cover: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    let covered = |cover: &std::collections::BTreeMap<u64, u64>, start: u64, end: u64| {
        cover
            .range(..=start)
            .next_back()
            .is_some_and(|(_, &e)| e >= end)
    };
    let mut out = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        if layer.index.len() > budget {
            break;
        }
        budget -= layer.index.len();
        if i > 0
            && layer
                .index
                .iter()
                .all(|e| covered(&cover, e.start, e.end()))
        {
            out.push(i);
            continue;
        }
        for e in layer.index.iter() {
            add_range(&mut cover, e.start, e.end());
        }
    }
    out
}

/// Adds `[start, end)` to a set of disjoint, non-adjacent ranges, merging what it touches.
fn add_range(cover: &mut std::collections::BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if let Some((&s, &e)) = cover.range(..=start).next_back() {
        if e >= start {
            start = s;
            end = end.max(e);
            cover.remove(&s);
        }
    }
    let inside: Vec<(u64, u64)> = cover.range(start..=end).map(|(&s, &e)| (s, e)).collect();
    for (s, e) in inside {
        end = end.max(e);
        cover.remove(&s);
    }
    cover.insert(start, end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_when_they_touch_or_overlap() {
        let mut c = std::collections::BTreeMap::new();
        add_range(&mut c, 10, 20);
        add_range(&mut c, 30, 40);
        assert_eq!(c.len(), 2);
        add_range(&mut c, 20, 25); // touches the first
        assert_eq!(c.get(&10), Some(&25));
        add_range(&mut c, 5, 35); // swallows both
        assert_eq!(c.into_iter().collect::<Vec<_>>(), vec![(5, 40)]);
    }

    fn l(pages: u64) -> LayerRef {
        LayerRef {
            blob_id: String::new(),
            size_bytes: 0,
            data_pages: pages,
        }
    }

    #[test]
    fn tiers() {
        assert_eq!(tier(&l(1), 12), 0);
        assert_eq!(tier(&l(1024), 12), 1); // 4 MiB
        assert_eq!(tier(&l(4 * 1024), 12), 2); // 16 MiB
        assert_eq!(tier(&l(4 * 1024 - 1), 12), 1);
    }

    #[test]
    fn picks_the_oldest_part_of_a_long_enough_run() {
        let big = 16 * 1024;
        assert_eq!(pick_run(&[l(1), l(1), l(1)], 12), None);
        assert_eq!(
            pick_run(&[l(big), l(1), l(1), l(1), l(1)], 12),
            Some((1, 5))
        );
        assert_eq!(pick_run(&vec![l(1); 10], 12), Some((0, 8)));
        assert_eq!(
            pick_run(&[l(1), l(1), l(1), l(1), l(big)], 12),
            Some((0, 4))
        );
    }
}
