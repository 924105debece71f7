//! The checkpoint loop (DESIGN §7): snapshot the committed buffered pages and move the WAL on
//! to a new segment, write the snapshot as layer blobs, publish manifest g+1 (conditional
//! create), and only then drop the checkpointed entries from the index and delete the WAL
//! segments nothing refers to any more.
//!
//! Crash cases: a crash before the manifest is created leaves orphan blobs (the GC collects
//! them) and every segment in place; after it, recovery skips WAL changes with a change count
//! at or below the manifest's, and the next checkpoint deletes the segments that held them.

use super::buffer::open_layer;
use super::extent::{Extent, ExtentValue};
use super::layer::{write_layer, SourceExtent};
use super::log::BufVal;
use super::manifest::LayerRef;
use super::session::Session;
use super::wal::{self, PageCrcs, WalFile};
use super::{Error, Result};
use crate::catalog::Edit;
use crate::limits::CHECKPOINT_LAYER_PAGES_MAX;
use crate::store::keys;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Backoff after a failed checkpoint: doubles from MIN up to MAX.
const RETRY_BACKOFF_MIN_MS: u64 = 500;
const RETRY_BACKOFF_MAX_MS: u64 = 30_000;

pub fn start_thread(s: &Arc<Session>) -> std::io::Result<()> {
    let weak = Arc::downgrade(s);
    let name = format!("ckpt-{}", s.image_id);
    let what = format!("image {}: checkpoint thread", s.image_id);
    s.checkpointer.start(name, what, move || run(weak))
}

fn next_delay_ms(s: &Session, failures: u32) -> u64 {
    let cfg = &s.buffer.cfg;
    if failures > 0 {
        return (RETRY_BACKOFF_MIN_MS << failures.min(10)).min(RETRY_BACKOFF_MAX_MS);
    }
    let jitter = if cfg.checkpoint_interval_jitter_ms > 0 {
        (keys::random_u128() as u64) % (cfg.checkpoint_interval_jitter_ms + 1)
    } else {
        0
    };
    cfg.checkpoint_interval_ms + jitter
}

fn run(weak: Weak<Session>) {
    let mut failures = 0u32;
    loop {
        let Some(s) = weak.upgrade() else { return };
        s.checkpointer
            .sleep(Duration::from_millis(next_delay_ms(&s, failures)));
        if s.is_stopped() {
            return;
        }
        match s.checkpoint() {
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                log::error!("{e} (checkpoint attempt {failures} failed; will retry)");
                continue;
            }
        }
        if s.connection_count() == 0 {
            // Merges deferred during a write burst run now; the compaction thread wakes us
            // when it is done, and only then does the session close.
            let merging = s.compaction_pending() && !s.compactor.is_failing();
            if merging {
                s.wake_compaction();
            } else if s.buffer.try_close_idle(&s) {
                log::info!("image {}: idle, closed", s.image_id);
                return;
            }
        }
    }
}

struct Snapshot {
    extents: Vec<Extent<BufVal>>,
    /// The segments the extents point into.
    segments: BTreeMap<u64, Arc<File>>,
    change_count: u64,
    /// The page checksums of the segment sealed for this snapshot, which holds its pages
    /// written since the last checkpoint (others are checksummed from their data).
    page_crcs: Option<(u64, PageCrcs)>,
}

impl Session {
    /// One checkpoint. Returns the number of pages moved out of the buffer.
    pub fn checkpoint(&self) -> Result<u64> {
        self.check_usable()?;
        let _one_at_a_time = self.checkpointer.one_at_a_time();
        if self.buffer.cfg.disable_image_store_write {
            // Nothing is uploaded and no segment deleted, but the log still moves on to new
            // segments, so that none outgrows SEGMENT_BYTES_MAX.
            let log = &self.log;
            let full =
                log.writer.lock().unwrap().wal.end > self.buffer.cfg.wal_segment_checkpoint_bytes;
            if full {
                let next = log.prepare_segment(&self.buffer)?;
                let mut w = log.writer.lock().unwrap();
                log.rotate(&mut w, next)?; // (no layer to write: the checksums go)
            }
            return Ok(0);
        }
        if self.buffer_is_empty() || self.version.manifest().is_none() {
            self.log.retire(&self.buffer)?;
            return Ok(0);
        }
        // Creating a segment costs two fsyncs: do it before taking the writer lock.
        let next = self.log.prepare_segment(&self.buffer)?;
        let next_path = next.path.clone();
        let snap = match self.snapshot_and_rotate(next) {
            Ok((snap, rotated)) => {
                if !rotated {
                    let _ = std::fs::remove_file(&next_path);
                }
                match snap {
                    Some(s) => s,
                    None => return Ok(0),
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&next_path);
                return Err(e);
            }
        };
        let started = std::time::Instant::now();
        let pages: u64 = snap.extents.iter().map(|e| e.len).sum();
        let refs = self.upload_layers(&snap)?;
        let uploaded = started.elapsed();
        let mut opened = Vec::with_capacity(refs.len());
        for r in &refs {
            opened.push(Arc::new(open_layer(
                &self.buffer,
                &self.image_id,
                &r.blob_id,
            )?));
        }
        // Checkpoints and compactions publish one at a time, each on top of the newest
        // manifest; the slow part (writing and uploading blobs) happened above, unlocked.
        let publishing = self.version.lock_publishing();
        let Some(base) = self.version.manifest() else {
            return Ok(0);
        };
        let edit = Edit::Append {
            change_count: snap.change_count,
            layers: refs.clone(),
        };
        // The layers join the version before their pages leave the buffer (see `read.rs`).
        let next = self.publish(&publishing, &base, &edit, opened)?;
        self.log.forget_through(snap.change_count);
        log::info!(
            "image {}: checkpoint: {pages} pages in {} layer(s), manifest generation {}, \
             change {} ({} ms writing layers, {} ms in all)",
            self.image_id,
            refs.len(),
            next.generation,
            next.change_count,
            uploaded.as_millis(),
            started.elapsed().as_millis()
        );
        self.remeasure_debt();
        self.notify_drained();
        drop(publishing);
        self.log.retire(&self.buffer)?;
        self.wake_compaction();
        super::blob_file::release_idle_buffers();
        crate::memory::release_freed();
        Ok(pages)
    }

    /// Under the writer lock: the committed buffered pages and their change count, and — if
    /// the newest segment holds records — a SEAL on it and `next` as the newest segment, so
    /// that every record in the snapshot's segments is at or below that change count, or
    /// belongs to a transaction still open. Returns whether `next` was taken.
    fn snapshot_and_rotate(&self, next: WalFile) -> Result<(Option<Snapshot>, bool)> {
        let mut w = self.log.writer.lock().unwrap();
        let (extents, segments) = {
            let b = self.log.buffered.read().unwrap();
            if b.index.is_empty() || self.version.manifest().is_none() {
                return Ok((None, false));
            }
            // Sized once: collecting would grow it by doubling, up to twice the bytes.
            let mut extents = Vec::with_capacity(b.index.len());
            extents.extend(b.index.iter());
            (extents, b.segments.clone())
        };
        let mut snap = Snapshot {
            extents,
            segments,
            change_count: w.change_count,
            page_crcs: None,
        };
        if w.wal.end == wal::HEADER_SIZE {
            return Ok((Some(snap), false));
        }
        let sealed = w.wal.segment();
        snap.page_crcs = Some((sealed, self.log.rotate(&mut w, next)?));
        // Appends since the thread woke asked for this very checkpoint: forget them, or the
        // next one would start at once with only the pages written meanwhile.
        self.checkpointer.forget_wakes();
        Ok((Some(snap), true))
    }

    /// Writes the snapshot as layer blobs of at most CHECKPOINT_LAYER_PAGES_MAX pages each.
    fn upload_layers(&self, snap: &Snapshot) -> Result<Vec<LayerRef>> {
        let mut refs = Vec::new();
        let (mut first, mut group_pages) = (0, 0);
        for (i, e) in snap.extents.iter().enumerate() {
            group_pages += e.len;
            if group_pages >= CHECKPOINT_LAYER_PAGES_MAX {
                refs.push(self.upload_layer(snap, &snap.extents[first..=i])?);
                (first, group_pages) = (i + 1, 0);
            }
        }
        if first < snap.extents.len() {
            refs.push(self.upload_layer(snap, &snap.extents[first..])?);
        }
        Ok(refs)
    }

    fn upload_layer(&self, snap: &Snapshot, group: &[Extent<BufVal>]) -> Result<LayerRef> {
        let sources = group.iter().map(|e| {
            let (start, len) = (e.start, e.len);
            if e.value.is_zero() {
                SourceExtent::Zero { start, len }
            } else {
                SourceExtent::Data { start, len }
            }
        });
        let mut next_extent = 0;
        let bits = self.page_size_bits;
        self.write_and_upload(sources, |start, n, buf, crcs| {
            // Extents are visited in order; find the one holding `start`.
            while group[next_extent].end() <= start {
                next_extent += 1;
            }
            let e = &group[next_extent];
            let (seg, off) = wal::split_position(e.value.advance(start - e.start).pos);
            debug_assert!(start + n <= e.end());
            let file = snap.segments.get(&seg).ok_or_else(|| {
                std::io::Error::other(format!("WAL segment {seg} is not open (page {start})"))
            })?;
            file.read_exact_at(buf, off)?;
            let known = snap.page_crcs.as_ref().filter(|(s, _)| *s == seg);
            if let Some(found) = known.and_then(|(_, c)| c.lookup(off, n, bits)) {
                debug_assert!(
                    buf.chunks(1 << bits)
                        .zip(found)
                        .all(|(page, &crc)| super::checksum::crc32c(page) == crc),
                    "page checksums recorded at append match the WAL's pages"
                );
                crcs.extend_from_slice(found);
            }
            Ok(())
        })
    }

    /// Writes a layer blob from `sources` into the buffer store's tmp directory and uploads it.
    pub(super) fn write_and_upload(
        &self,
        sources: impl Iterator<Item = SourceExtent> + Clone,
        read_pages: impl FnMut(u64, u64, &mut [u8], &mut Vec<u32>) -> std::io::Result<()>,
    ) -> Result<LayerRef> {
        let blob_id = keys::new_blob_id();
        let tmp = self.buffer.tmp_dir().join(&blob_id);
        let written = write_layer(&tmp, self.page_size_bits, sources, read_pages);
        let (size_bytes, data_pages) = match written {
            Ok(x) => x,
            Err(source) => {
                let _ = std::fs::remove_file(&tmp);
                let op = "write layer";
                return Err(Error::Io {
                    image: self.image_id.clone(),
                    op,
                    source,
                });
            }
        };
        let put = self.buffer.store.put_file(&keys::blob_key(&blob_id), &tmp);
        let _ = std::fs::remove_file(&tmp);
        put.map_err(|source| Error::Store {
            image: self.image_id.clone(),
            source,
        })?;
        Ok(LayerRef {
            blob_id,
            size_bytes,
            data_pages,
        })
    }
}
