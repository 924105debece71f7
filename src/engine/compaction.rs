//! Compaction (DESIGN §7): the job that pays back write debt. After each checkpoint it asks
//! the policy (`debt::plan`, a pure function of the layer list) for the next step and carries
//! it out — reorders the manifest, or merges layers (newer extents shadow older ones, zero
//! extents drop out where nothing older remains beneath them) into new layer blobs — and
//! publishes manifest g+1 (conditional create, like a checkpoint). The old blobs become
//! garbage for `mvps-s3-gc`. Writes are paced by the debt measured here
//! (`Session::pace_writes`), never deferred indefinitely: compaction always runs.

use super::buffer::open_layer;
use super::debt::{self, cut_points, Debt, Shape, Spans, Step};
use super::extent::{Extent, ExtentMap, ExtentValue};
use super::layer::{Layer, LayerVal, SourceExtent};
use super::manifest::{LayerRef, Manifest};
use super::session::Session;
use super::Result;
use crate::catalog::Edit;
use crate::store::BlobStream;
use std::sync::Arc;
use std::time::Duration;

/// Most layer extents a pass looks at, newest layers first, to find layers that newer ones
/// cover entirely (`drop_shadowed`). The scan is in memory but runs after every checkpoint;
/// layers of large writes have few extents, and those are the ones it finds.
pub const SHADOW_SCAN_EXTENTS_MAX: usize = 1 << 16;
/// Most steps in one pass; the thread checks for shutdown between steps and passes.
pub const STEPS_PER_PASS_MAX: usize = 64;

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

/// Starts the session's compaction thread: it runs a pass whenever a checkpoint wakes it.
pub fn start_thread(s: &Arc<Session>) -> std::io::Result<()> {
    let weak = Arc::downgrade(s);
    let name = format!("compact-{}", s.image_id);
    let what = format!("image {}: compaction thread", s.image_id);
    s.compactor.start(name, what, move || run(weak))
}

fn run(weak: std::sync::Weak<Session>) {
    // Merges due when the session opened run after its first checkpoint, or when its last
    // client leaves (the idle session compacts before it closes).
    let mut delay = IDLE_WAIT_MS;
    loop {
        let Some(s) = weak.upgrade() else { return };
        s.compactor.sleep(Duration::from_millis(delay));
        if s.is_stopped() {
            return;
        }
        delay = match s.compact() {
            Ok(()) => IDLE_WAIT_MS,
            Err(e) => {
                s.compactor.set_failing(true);
                s.notify_drained(); // writers waiting on compaction stop waiting
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

/// The layers of a manifest as the policy sees them, with what a step needs to carry out.
struct Picture {
    /// Blob ids, oldest first (the manifest's order).
    ids: Vec<String>,
    /// The opened layers, oldest first.
    layers: Vec<Arc<Layer>>,
    shapes: Vec<Shape>,
    live_bytes: u64,
}

impl Session {
    /// Runs compaction steps until the policy has none left (or the session stops). One pass
    /// at a time: the compaction thread and a caller (tests, an idle close) may both ask.
    pub fn compact(&self) -> Result<()> {
        let _one_at_a_time = self.compactor.one_at_a_time();
        self.drop_shadowed()?;
        // Each step measures the debt it starts from; one that ended the pass by the bound or
        // a stop leaves its result unmeasured.
        let mut unmeasured = false;
        for _ in 0..STEPS_PER_PASS_MAX {
            if self.is_stopped() {
                break;
            }
            unmeasured = self.compact_step()?;
            if !unmeasured {
                break;
            }
        }
        if unmeasured {
            self.picture();
        }
        self.compactor.set_failing(false);
        Ok(())
    }

    /// Some compaction step is due.
    pub fn compaction_pending(&self) -> bool {
        self.picture().is_some_and(|p| {
            debt::plan(
                &self.buffer.cfg.policy,
                &p.shapes,
                p.live_bytes,
                self.page_size_bits,
            )
            .is_some()
        })
    }

    /// The last compaction failed (the image store is failing): an idle session may close
    /// without waiting for it.
    pub fn compaction_failing(&self) -> bool {
        self.compactor.is_failing()
    }

    /// The debt of the newest manifest, as last measured.
    pub fn debt(&self) -> Debt {
        self.version.debt()
    }

    /// Measures the debt again after a checkpoint added layers, for write pacing. Layers,
    /// stored bytes and read depth are exact; for the live bytes (a full count is the
    /// compaction thread's, in its next `picture`) the last count plus every byte added since
    /// stands in — an upper bound, so that pacing never stalls writers on a stale count.
    pub(super) fn remeasure_debt(&self) {
        let layers: Vec<Arc<Layer>> = self.version.layers().into_iter().rev().collect();
        let shapes = shapes(&layers);
        let mut d = self.version.lock_debt();
        // Never measured (the image's first layers): count once.
        let live_bytes = if d.layers == 0 {
            live_pages(&layers) << self.page_size_bits
        } else {
            let stored: u64 = shapes.iter().map(|s| s.bytes).sum();
            d.live_bytes + stored.saturating_sub(d.stored_bytes)
        };
        *d = Debt::measure(&shapes, live_bytes);
    }

    /// The current layers; None before the first manifest. Also records their debt, which
    /// paces writes.
    fn picture(&self) -> Option<Picture> {
        let (ids, layers) = {
            let version = self.version.read();
            let m = version.manifest.as_ref()?;
            let ids: Vec<String> = m.layers.iter().map(|l| l.blob_id.clone()).collect();
            // The version holds the manifest's layers newest first.
            let layers: Vec<Arc<Layer>> = version.layers.iter().rev().cloned().collect();
            (ids, layers)
        };
        let shapes = shapes(&layers);
        let live_bytes = live_pages(&layers) << self.page_size_bits;
        *self.version.lock_debt() = Debt::measure(&shapes, live_bytes);
        self.notify_drained(); // writers paced by the debt look again
        Some(Picture {
            ids,
            layers,
            shapes,
            live_bytes,
        })
    }

    /// One step of the policy. Returns false when none was due.
    fn compact_step(&self) -> Result<bool> {
        self.check_usable()?;
        let Some(pic) = self.picture() else {
            return Ok(false);
        };
        let Some(step) = debt::plan(
            &self.buffer.cfg.policy,
            &pic.shapes,
            pic.live_bytes,
            self.page_size_bits,
        ) else {
            return Ok(false);
        };
        let started = std::time::Instant::now();
        let inputs: Vec<Arc<Layer>> = step
            .inputs()
            .iter()
            .map(|&i| pic.layers[i].clone())
            .collect();
        // The slow part, with no lock held: checkpoints go on meanwhile.
        let refs = if inputs.is_empty() {
            Vec::new()
        } else {
            self.merge(&inputs, &step)?
        };
        let mut opened = Vec::with_capacity(refs.len());
        for r in &refs {
            opened.push(Arc::new(open_layer(
                &self.buffer,
                &self.image_id,
                &r.blob_id,
            )?));
        }
        let publishing = self.version.lock_publishing();
        let Some(base) = self.version.manifest() else {
            return Ok(false);
        };
        // Only checkpoints changed the manifest since the picture (compaction runs one pass
        // at a time), and they only append layers.
        let unchanged = base.layers.len() >= pic.ids.len()
            && base
                .layers
                .iter()
                .zip(&pic.ids)
                .all(|(l, id)| &l.blob_id == id);
        assert!(
            unchanged,
            "image {}: manifest changed under compaction",
            self.image_id
        );
        let edit = Edit::SetLayers(step.apply(&base.layers, refs.clone()));
        let next = self.publish(&publishing, &base, &edit, opened)?;
        let what = match &step {
            Step::Sink { .. } => "moved layers disjoint from all older ones into the base".into(),
            Step::IntoBase { inputs, .. } => {
                format!(
                    "merged {} layers into {} base layer(s)",
                    inputs.len(),
                    refs.len()
                )
            }
            Step::Deltas { start, end } => format!("merged {} deltas", end - start),
            Step::Coalesce { inputs } => format!("coalesced {} base layers", inputs.len()),
        };
        let written: u64 = refs.iter().map(|r| r.size_bytes).sum();
        log::info!(
            "image {}: compaction: {what} ({} MiB written in {} ms), manifest generation {}, \
             {} layers",
            self.image_id,
            written >> 20,
            started.elapsed().as_millis(),
            next.generation,
            next.layers.len()
        );
        drop(publishing);
        // (The next step's `picture` measures the new debt and wakes paced writers.)
        super::blob_file::release_idle_buffers();
        crate::memory::release_freed();
        Ok(true)
    }

    /// Takes out of the manifest every layer whose pages newer layers all cover: no read can
    /// reach it any more (a whole-image rewrite, say, leaves every older layer dead), so it
    /// goes without being merged — no data is copied. Returns how many layers went.
    pub fn drop_shadowed(&self) -> Result<usize> {
        self.check_usable()?;
        let (ids, layers) = {
            let version = self.version.read();
            let Some(m) = version.manifest.as_ref() else {
                return Ok(0);
            };
            let ids: Vec<String> = m.layers.iter().rev().map(|l| l.blob_id.clone()).collect();
            (ids, version.layers.clone())
        };
        // Both newest first.
        debug_assert!(ids.iter().zip(&layers).all(|(id, l)| id == &l.blob_id));
        let shadowed = shadowed_layers(&layers, SHADOW_SCAN_EXTENTS_MAX);
        if shadowed.is_empty() {
            return Ok(0);
        }
        let publishing = self.version.lock_publishing();
        let Some(base) = self.version.manifest() else {
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
        let edit = Edit::Drop(gone.iter().map(|id| id.to_string()).collect());
        let next = self.publish(&publishing, &base, &edit, Vec::new())?;
        log::info!(
            "image {}: compaction: dropped {} layer(s) that newer layers cover, manifest \
             generation {}",
            self.image_id,
            gone.len(),
            next.generation
        );
        Ok(gone.len())
    }

    /// Writes the merge of `run` (oldest first) as layers cut where `step` says; none if
    /// nothing remains.
    fn merge(&self, run: &[Arc<Layer>], step: &Step) -> Result<Vec<LayerRef>> {
        let mut map: ExtentMap<Src> = ExtentMap::new();
        for (i, layer) in run.iter().enumerate() {
            for e in layer.index.iter() {
                map.insert(e.start, e.len, Src(i, e.value));
            }
        }
        if step.at_bottom() {
            map.retain(|v| v.1 != LayerVal::Zero);
        }
        let max_data_pages = match step {
            Step::Deltas { .. } => u64::MAX,
            _ => (self.buffer.cfg.policy.base_partition_bytes >> self.page_size_bits).max(1),
        };
        let cuts = {
            let outline: Vec<(u64, u64, bool)> = map
                .iter()
                .map(|e| (e.start, e.len, e.value.1 != LayerVal::Zero))
                .collect();
            cut_points(&outline, step.fences(), max_data_pages)
        };
        // One output layer's extents at a time, taken out of the map as they go: a merge
        // holds its extent map once, not also a copy of it (RSS, docs/PERFORMANCE.md).
        let mut refs = Vec::with_capacity(cuts.len() + 1);
        // Each input is read once, in page order, across all output layers: past the page
        // cache where the store can.
        let mut streams: Vec<_> = run.iter().map(|l| l.data_stream()).collect();
        for_each_group(map.into_extents(), &cuts, |group| {
            refs.push(self.write_merged(run, &mut streams, &group)?);
            Ok(())
        })?;
        Ok(refs)
    }

    /// Writes one merged layer from `extents` (in page order) of the layers `run`, read
    /// through `streams` (one per layer of `run`, from `Layer::data_stream`).
    fn write_merged(
        &self,
        run: &[Arc<Layer>],
        streams: &mut [Option<Box<dyn BlobStream + '_>>],
        extents: &[Extent<Src>],
    ) -> Result<LayerRef> {
        let sources = extents.iter().map(|e| {
            let (start, len) = (e.start, e.len);
            match e.value.1 {
                LayerVal::Zero => SourceExtent::Zero { start, len },
                LayerVal::Data(_) => SourceExtent::Data { start, len },
            }
        });
        let mut next = 0;
        // Pages are copied after their checksums are verified, so those checksums carry over.
        self.write_and_upload(sources, |start, _n, buf, crcs| {
            if self.is_stopped() {
                // A merge can take seconds: a stopping server does not wait for it.
                return Err(std::io::Error::other("the session stopped"));
            }
            while extents[next].end() <= start {
                next += 1;
            }
            let e = &extents[next];
            let Src(i, LayerVal::Data(page)) = e.value.advance(start - e.start) else {
                unreachable!("only data extents are read");
            };
            run[i]
                .read_data_with_crcs(streams[i].as_deref_mut(), page, buf, crcs)
                .map_err(std::io::Error::other)
        })
    }
}

/// Indexes (into `layers`, newest first) of the layers whose every page a newer layer maps,
/// looking at no more than `budget` extents (older layers past it are not checked).
fn shadowed_layers(layers: &[Arc<Layer>], mut budget: usize) -> Vec<usize> {
    // The pages mapped by the layers seen so far.
    let mut cover = Spans::default();
    let mut out = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        if layer.index.len() > budget {
            break;
        }
        budget -= layer.index.len();
        if i > 0 && layer.index.iter().all(|e| cover.covers(e.start, e.end())) {
            out.push(i);
            continue;
        }
        for e in layer.index.iter() {
            cover.add(e.start, e.end());
        }
    }
    out
}

/// The debt of image version `m`, measured from its layers in `store` (their headers and
/// indexes are read): for operators (`mvpsctl`) and tests.
pub fn measure(store: &dyn crate::store::ImageStore, m: &Manifest) -> crate::store::Result<Debt> {
    let mut layers = Vec::with_capacity(m.layers.len());
    for l in &m.layers {
        let reader = store.open_blob(&crate::store::keys::blob_key(&l.blob_id))?;
        layers.push(Arc::new(Layer::open(&l.blob_id, reader)?));
    }
    let shapes: Vec<Shape> = layers.iter().map(|l| shape(l)).collect();
    Ok(Debt::measure(
        &shapes,
        live_pages(&layers) << m.page_size_bits,
    ))
}

/// The policy's view of a layer (judged by its span: see `shapes`).
fn shape(l: &Layer) -> Shape {
    let (first, end) = l.index.span();
    Shape {
        first,
        end,
        data_pages: l.data_pages(),
        bytes: l.size_bytes(),
        pages_disjoint: false,
    }
}

/// The policy's view of `layers` (oldest first), each told whether it maps no page an older
/// one maps. One walk over every extent.
pub fn shapes(layers: &[Arc<Layer>]) -> Vec<Shape> {
    let mut seen = Spans::default();
    layers
        .iter()
        .map(|l| {
            let mut s = shape(l);
            s.pages_disjoint = l.index.iter().all(|e| !seen.intersects(e.start, e.end()));
            for e in l.index.iter() {
                seen.add(e.start, e.end());
            }
            s
        })
        .collect()
}

/// Distinct pages whose newest mapping in `layers` (oldest first) is data.
pub fn live_pages(layers: &[Arc<Layer>]) -> u64 {
    let mut seen = Spans::default();
    let mut live = 0;
    for l in layers.iter().rev() {
        for e in l.index.iter() {
            if e.value != LayerVal::Zero {
                live += seen
                    .missing(e.start, e.end())
                    .iter()
                    .map(|(s, e)| e - s)
                    .sum::<u64>();
            }
            seen.add(e.start, e.end());
        }
    }
    live
}

/// Calls `f` with the extents (in page order) of each group that `cuts` (sorted) begin,
/// splitting an extent a cut falls in; empty groups are skipped.
fn for_each_group<V: ExtentValue, E>(
    extents: impl IntoIterator<Item = Extent<V>>,
    cuts: &[u64],
    mut f: impl FnMut(Vec<Extent<V>>) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut group: Vec<Extent<V>> = Vec::new();
    let mut cut = cuts.iter().peekable();
    for mut e in extents {
        while let Some(&&c) = cut.peek() {
            if c >= e.end() {
                break;
            }
            if c > e.start {
                let head = c - e.start;
                group.push(Extent {
                    start: e.start,
                    len: head,
                    value: e.value.clone(),
                });
                e = Extent {
                    start: c,
                    len: e.len - head,
                    value: e.value.advance(head),
                };
            }
            if !group.is_empty() {
                f(std::mem::take(&mut group))?;
            }
            cut.next();
        }
        group.push(e);
    }
    if !group.is_empty() {
        f(group)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct At(u64);
    impl ExtentValue for At {
        fn advance(&self, pages: u64) -> Self {
            At(self.0 + pages)
        }
    }

    fn ex(start: u64, len: u64, at: u64) -> Extent<At> {
        Extent {
            start,
            len,
            value: At(at),
        }
    }

    fn split_at(extents: Vec<Extent<At>>, cuts: &[u64]) -> Vec<Vec<Extent<At>>> {
        let mut groups = Vec::new();
        for_each_group(extents, cuts, |g| {
            groups.push(g);
            Ok::<(), ()>(())
        })
        .unwrap();
        groups
    }

    #[test]
    fn groups_begin_at_cuts_and_split_extents_they_fall_in() {
        let extents = vec![ex(0, 10, 100), ex(20, 5, 200)];
        assert_eq!(split_at(extents.clone(), &[]), vec![extents.clone()]);
        assert_eq!(
            split_at(extents.clone(), &[4, 20, 22]),
            vec![
                vec![ex(0, 4, 100)],
                vec![ex(4, 6, 104)],
                vec![ex(20, 2, 200)],
                vec![ex(22, 3, 202)]
            ]
        );
        // A cut in a gap starts the next group at the next extent.
        assert_eq!(
            split_at(extents, &[15]),
            vec![vec![ex(0, 10, 100)], vec![ex(20, 5, 200)]]
        );
    }

    #[test]
    fn tiers() {
        let l = |pages| Shape {
            first: 0,
            end: pages,
            data_pages: pages,
            bytes: 0,
            pages_disjoint: false,
        };
        let tier = |s: &Shape| debt::tier(s, 12, debt::TIER_BASE_BYTES);
        assert_eq!(tier(&l(1)), 0);
        assert_eq!(tier(&l(1024)), 1); // 4 MiB
        assert_eq!(tier(&l(4 * 1024)), 2); // 16 MiB
        assert_eq!(tier(&l(4 * 1024 - 1)), 1);
        let big = 16 * 1024;
        let pick = |ls: &[Shape]| debt::pick_tier_run(ls, tier);
        assert_eq!(pick(&[l(1), l(1), l(1)]), None);
        assert_eq!(pick(&[l(big), l(1), l(1), l(1), l(1)]), Some((1, 5)));
        assert_eq!(pick(&vec![l(1); 10]), Some((0, 8)));
        assert_eq!(pick(&[l(1), l(1), l(1), l(1), l(big)]), Some((0, 4)));
    }
}
