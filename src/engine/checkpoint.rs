//! The checkpoint loop (DESIGN §7): snapshot the committed buffered pages, write them as layer
//! blobs, publish manifest g+1 (conditional create), and only then drop the checkpointed
//! entries from the index. Afterwards the WAL is rewritten if it is mostly dead.
//!
//! Crash cases: a crash before the manifest is created leaves orphan blobs (the GC collects
//! them) and the WAL unchanged; after it, recovery skips WAL changes with a change count at or
//! below the manifest's.

use super::extent::{Extent, ExtentValue};
use super::layer::{write_layer, SourceExtent};
use super::manifest::{self, LayerRef, Manifest};
use super::open::{now_unix, open_layer};
use super::session::{BufVal, Session};
use super::{Error, Result};
use crate::limits::CHECKPOINT_LAYER_PAGES_MAX;
use crate::store::keys;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Backoff after a failed checkpoint: doubles from MIN up to MAX.
const RETRY_BACKOFF_MIN_MS: u64 = 500;
const RETRY_BACKOFF_MAX_MS: u64 = 30_000;

pub fn start_thread(s: &Arc<Session>) {
    let weak = Arc::downgrade(s);
    let name = format!("ckpt-{}", s.image_id);
    let h = std::thread::Builder::new()
        .name(name)
        .spawn(move || run(weak))
        .expect("spawn checkpoint thread");
    *s.checkpoint_thread.lock().unwrap() = Some(h);
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
        let delay = Duration::from_millis(next_delay_ms(&s, failures));
        {
            let (m, c) = &s.wake;
            let mut woken = m.lock().unwrap();
            if !*woken {
                woken = c.wait_timeout(woken, delay).unwrap().0;
            }
            *woken = false;
        }
        if s.closed.load(Ordering::Acquire) || s.fenced.load(Ordering::Acquire) {
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
        if s.connection_count() == 0 && s.buffer.try_close_idle(&s) {
            log::info!("image {}: idle, closed", s.image_id);
            return;
        }
    }
}

struct Snapshot {
    extents: Vec<Extent<BufVal>>,
    wal: Arc<std::fs::File>,
    change_count: u64,
}

impl Session {
    /// One checkpoint. Returns the number of pages moved out of the buffer.
    pub fn checkpoint(&self) -> Result<u64> {
        if self.buffer.cfg.disable_image_store_write {
            return Ok(0);
        }
        self.check_usable()?;
        let Some(snap) = self.snapshot() else {
            return Ok(0);
        };
        let refs = self.upload_layers(&snap)?;
        let pages: u64 = snap.extents.iter().map(|e| e.len).sum();
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
        let _publishing = self.manifest_lock.lock().unwrap();
        let base = self.writer.lock().unwrap().manifest.clone();
        let Some(mut next) = base else { return Ok(0) };
        next.generation += 1;
        next.change_count = snap.change_count;
        next.layers.extend(refs.iter().cloned());
        next.created_at_unix = now_unix();
        self.publish(&next)?;
        {
            let mut w = self.writer.lock().unwrap();
            let mut v = self.view.write().unwrap();
            for l in opened {
                v.layers.insert(0, l);
            }
            v.index.retain(|val| val.change > snap.change_count);
            w.manifest = Some(next.clone());
        }
        log::info!(
            "image {}: checkpoint: {pages} pages in {} layer(s), manifest generation {}, change {}",
            self.image_id,
            refs.len(),
            next.generation,
            next.change_count
        );
        let (m, c) = &self.drained;
        *m.lock().unwrap() += 1;
        c.notify_all();
        drop(_publishing);
        self.maybe_rewrite_wal()?;
        self.wake_compaction();
        Ok(pages)
    }

    /// Creates manifest `next` (generation g+1) with a conditional create. If another buffer
    /// store wrote that generation first, this session is fenced from then on.
    pub(super) fn publish(&self, next: &Manifest) -> Result<()> {
        let created = manifest::create(self.buffer.store.as_ref(), next).map_err(|source| {
            Error::Manifest {
                image: self.image_id.clone(),
                source,
            }
        })?;
        if created {
            return Ok(());
        }
        self.fenced.store(true, Ordering::Release);
        log::error!(
            "image {}: fenced: generation {} was written by another buffer store. This \
             server stops writing the image; its WAL stays in the buffer store for \
             inspection. Serve the image from the new owner only.",
            self.image_id,
            next.generation
        );
        Err(Error::Fenced {
            image: self.image_id.clone(),
        })
    }

    fn snapshot(&self) -> Option<Snapshot> {
        let w = self.writer.lock().unwrap();
        let v = self.view.read().unwrap();
        if v.index.is_empty() {
            return None;
        }
        w.manifest.as_ref()?;
        Some(Snapshot {
            extents: v.index.iter().collect(),
            wal: v.wal_file.clone(),
            change_count: w.change_count,
        })
    }

    /// Writes the snapshot as layer blobs of at most CHECKPOINT_LAYER_PAGES_MAX pages each.
    fn upload_layers(&self, snap: &Snapshot) -> Result<Vec<LayerRef>> {
        let mut refs = Vec::new();
        let mut group: Vec<&Extent<BufVal>> = Vec::new();
        let mut group_pages = 0;
        for e in &snap.extents {
            group.push(e);
            group_pages += e.len;
            if group_pages >= CHECKPOINT_LAYER_PAGES_MAX {
                refs.push(self.upload_layer(snap, &group)?);
                group.clear();
                group_pages = 0;
            }
        }
        if !group.is_empty() {
            refs.push(self.upload_layer(snap, &group)?);
        }
        Ok(refs)
    }

    fn upload_layer(&self, snap: &Snapshot, group: &[&Extent<BufVal>]) -> Result<LayerRef> {
        let sources: Vec<SourceExtent> = group
            .iter()
            .map(|e| {
                if e.value.is_zero() {
                    SourceExtent::Zero {
                        start: e.start,
                        len: e.len,
                    }
                } else {
                    SourceExtent::Data {
                        start: e.start,
                        len: e.len,
                    }
                }
            })
            .collect();
        let mut next_extent = 0;
        self.write_and_upload(&sources, |start, n, buf| {
            // Extents are visited in order; find the one holding `start`.
            while group[next_extent].end() <= start {
                next_extent += 1;
            }
            let e = group[next_extent];
            let off = e.value.advance(start - e.start).offset;
            debug_assert!(start + n <= e.end());
            snap.wal.read_exact_at(buf, off)
        })
    }

    /// Writes a layer blob from `sources` into the buffer store's tmp directory and uploads it.
    pub(super) fn write_and_upload(
        &self,
        sources: &[SourceExtent],
        read_pages: impl FnMut(u64, u64, &mut [u8]) -> std::io::Result<()>,
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
