//! Opening a session: manifest + WAL → index and layers, with the writer-id ownership rules of
//! DESIGN §4:
//! - WAL and newest manifest written by the same buffer store: resume.
//! - no WAL: take over: a new writer id, and a fenced manifest g+1 naming it.
//! - a WAL whose writer differs from the newest manifest's: refuse, naming both ids.

use super::buffer::BufferStore;
use super::checkpoint;
use super::extent::ExtentMap;
use super::layer::Layer;
use super::manifest::{self, writer_id_hex, Manifest, MANIFEST_FORMAT_VERSION};
use super::session::{BufVal, Session, View, WriterState};
use super::wal::{self, WalFile, WalHeader};
use super::{Error, Result};
use crate::store::keys;
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Layers opened at once when a session opens (each is one or two ranged GETs on S3).
const LAYER_OPEN_PARALLEL: usize = 16;

/// How many times a takeover re-reads the newest manifest when its conditional create races.
const TAKEOVER_ATTEMPTS_MAX: u32 = 5;

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Session {
    /// Opens the session of `image_id` with one connection attached (the caller's).
    pub fn open(
        buffer: Arc<BufferStore>,
        image_id: &str,
        page_size_bits: u32,
    ) -> Result<Arc<Session>> {
        let image = image_id.to_string();
        let store = buffer.store.clone();
        let manifest =
            manifest::load_latest(store.as_ref(), image_id).map_err(|source| Error::Manifest {
                image: image.clone(),
                source,
            })?;
        if let Some(m) = &manifest {
            if m.page_size_bits != page_size_bits {
                return Err(Error::Refused {
                    image,
                    why: format!(
                        "token page_size_bits {page_size_bits} does not match the image's {}",
                        m.page_size_bits
                    ),
                });
            }
        }
        let legacy = buffer.legacy_wal_path(image_id);
        if legacy.exists() {
            return Err(Error::Refused {
                image,
                why: format!(
                    "{} is a WAL in format 1 (one file per image); this build keeps the WAL \
                     in segment files (format 2). Let the previous mvps-te version checkpoint \
                     it (connect, disconnect, wait for \"idle, closed\" in its log), or move \
                     it aside (its un-checkpointed writes are then lost)",
                    legacy.display()
                ),
            });
        }
        let io = |op| {
            let image = image.clone();
            move |source| Error::Io { image, op, source }
        };
        wal::remove_stale_temps(&buffer.dir, image_id).map_err(io("remove WAL temp files"))?;
        let segments =
            wal::list_segments(&buffer.dir, image_id).map_err(io("list WAL segments"))?;
        let (writer, index, files) = if segments.is_empty() {
            take_over(&buffer, image_id, page_size_bits, manifest)?
        } else {
            resume(&buffer, image_id, page_size_bits, manifest, &segments)?
        };
        let layers = open_layers(&buffer, image_id, writer.manifest.as_ref())?;
        let view = View {
            segments: files,
            index,
            layers,
        };
        let s = Arc::new(Session::new(buffer, image_id, page_size_bits, writer, view));
        s.attach(); // the opener's connection (see BufferStore::attach)
        checkpoint::start_thread(&s);
        super::compaction::start_thread(&s);
        Ok(s)
    }
}

/// What opening a session's WAL gives: the writer's state, the buffered pages, and every
/// segment file by number.
type Opened = (WriterState, ExtentMap<BufVal>, BTreeMap<u64, Arc<File>>);

fn resume(
    buffer: &BufferStore,
    image_id: &str,
    bits: u32,
    manifest: Option<Manifest>,
    segments: &[(u64, std::path::PathBuf)],
) -> Result<Opened> {
    let image = image_id.to_string();
    let path = &segments[segments.len() - 1].1;
    let (mut wal, files, rec) = wal::recover(segments).map_err(|source| Error::Io {
        image: image.clone(),
        op: "open WAL",
        source,
    })?;
    let mut files: BTreeMap<u64, Arc<File>> = files.into_iter().collect();
    let h = &wal.header;
    if h.image_id != image_id || h.page_size_bits != bits {
        return Err(Error::Refused {
            image,
            why: format!(
                "WAL {} belongs to image {} with page_size_bits {}, not this token's",
                path.display(),
                h.image_id,
                h.page_size_bits
            ),
        });
    }
    let ours = writer_id_hex(h.writer_id);
    if let Some(m) = &manifest {
        if m.writer_id != ours && !buffer.cfg.disable_image_store_write {
            return Err(Error::Refused {
                image,
                why: format!(
                    "image is owned by buffer store {} (newest manifest, generation {}), but \
                     this buffer store's WAL was written by {ours}. Another buffer store took \
                     the image over. To serve it here, move its WAL segments {} aside (their \
                     un-checkpointed writes are then lost) and reconnect",
                    m.writer_id,
                    m.generation,
                    buffer.dir.join(format!("{image_id}.*.wal")).display()
                ),
            });
        }
    }
    if rec.truncated_bytes > 0 {
        log::warn!(
            "image {image_id}: WAL recovery cut {} bytes of torn or corrupt tail ({} later \
             segment(s) dropped)",
            rec.truncated_bytes,
            rec.dropped_segments
        );
    }
    if rec.last_sealed {
        // Stopped right after a seal: appends go to a fresh segment.
        let header = WalHeader {
            segment: wal.segment() + 1,
            ..wal.header.clone()
        };
        let p = buffer.wal_segment_path(image_id, header.segment);
        wal = WalFile::create(&p, &header).map_err(|source| Error::Io {
            image: image.clone(),
            op: "create WAL segment",
            source,
        })?;
        files.insert(wal.segment(), wal.file.clone());
    }
    let base = manifest.as_ref().map(|m| m.change_count).unwrap_or(0);
    let mut index = ExtentMap::new();
    let mut replayed = 0;
    for c in &rec.committed {
        if c.change_count <= base {
            continue; // already in a layer
        }
        let v = BufVal {
            change: c.change_count,
            pos: c.payload_pos.unwrap_or(BufVal::ZERO),
            page_size_bits: bits as u8,
        };
        index.insert(c.first_page, c.page_count, v);
        replayed += 1;
    }
    log::info!(
        "image {image_id}: resumed writer {ours}: {replayed} WAL changes replayed, {} pages \
         buffered, manifest generation {}",
        index.pages(),
        manifest.as_ref().map(|m| m.generation).unwrap_or(0)
    );
    let mut w = WriterState {
        wal,
        next_seq: rec.next_seq,
        next_txn_id: rec.next_txn_id,
        change_count: rec.max_change_count.max(base),
        manifest,
        txns: Default::default(),
    };
    if w.manifest.is_none() && !buffer.cfg.disable_image_store_write {
        // The store has no manifest (new or wiped store): publish generation 1 as ours.
        let first = initial_manifest(image_id, bits, h_writer(&w), 1, 0, vec![]);
        publish_takeover(buffer, &mut w, first)?;
    }
    Ok((w, index, files))
}

fn h_writer(w: &WriterState) -> u128 {
    w.wal.header.writer_id
}

fn initial_manifest(
    image_id: &str,
    bits: u32,
    writer: u128,
    generation: u64,
    change_count: u64,
    layers: Vec<manifest::LayerRef>,
) -> Manifest {
    Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        image_id: image_id.to_string(),
        generation,
        change_count,
        writer_id: writer_id_hex(writer),
        page_size_bits: bits,
        layers,
        created_at_unix: now_unix(),
    }
}

/// Creates a new WAL with a fresh writer id and publishes a manifest naming it.
fn take_over(
    buffer: &BufferStore,
    image_id: &str,
    bits: u32,
    manifest: Option<Manifest>,
) -> Result<Opened> {
    let image = image_id.to_string();
    let writer_id = keys::random_u128();
    let header = WalHeader {
        page_size_bits: bits,
        writer_id,
        image_id: image.clone(),
        segment: 1,
    };
    let path = buffer.wal_segment_path(image_id, header.segment);
    let wal = WalFile::create(&path, &header).map_err(|source| Error::Io {
        image: image.clone(),
        op: "create WAL",
        source,
    })?;
    let base_cc = manifest.as_ref().map(|m| m.change_count).unwrap_or(0);
    let mut w = WriterState {
        wal,
        next_seq: 1,
        next_txn_id: 1,
        change_count: base_cc,
        manifest,
        txns: Default::default(),
    };
    if buffer.cfg.disable_image_store_write {
        log::info!(
            "image {image_id}: new writer {} (image store writes disabled)",
            writer_id_hex(writer_id)
        );
        let files = BTreeMap::from([(w.wal.segment(), w.wal.file.clone())]);
        return Ok((w, ExtentMap::new(), files));
    }
    let next = match &w.manifest {
        Some(m) => initial_manifest(
            image_id,
            bits,
            writer_id,
            m.generation + 1,
            m.change_count,
            m.layers.clone(),
        ),
        None => initial_manifest(image_id, bits, writer_id, 1, 0, vec![]),
    };
    let r = publish_takeover(buffer, &mut w, next);
    if r.is_err() {
        // Nothing was written to the WAL yet: remove it so a retry starts clean.
        let _ = std::fs::remove_file(&path);
    }
    r?;
    log::info!(
        "image {image_id}: took over as writer {} at manifest generation {}",
        writer_id_hex(writer_id),
        w.manifest.as_ref().map(|m| m.generation).unwrap_or(0)
    );
    let files = BTreeMap::from([(w.wal.segment(), w.wal.file.clone())]);
    Ok((w, ExtentMap::new(), files))
}

/// Writes `next` with a conditional create; if another writer raced us to that generation,
/// re-reads the newest manifest and tries on top of it.
fn publish_takeover(buffer: &BufferStore, w: &mut WriterState, mut next: Manifest) -> Result<()> {
    let image = next.image_id.clone();
    let store = buffer.store.as_ref();
    for _ in 0..TAKEOVER_ATTEMPTS_MAX {
        let created = manifest::create(store, &next).map_err(|source| Error::Manifest {
            image: image.clone(),
            source,
        })?;
        if created {
            w.change_count = w.change_count.max(next.change_count);
            w.manifest = Some(next);
            return Ok(());
        }
        let latest = manifest::load_latest(store, &image)
            .map_err(|source| Error::Manifest {
                image: image.clone(),
                source,
            })?
            .ok_or_else(|| Error::Refused {
                image: image.clone(),
                why: "manifest vanished".into(),
            })?;
        next.generation = latest.generation + 1;
        next.change_count = latest.change_count;
        next.layers = latest.layers;
    }
    Err(Error::Refused {
        image,
        why: "could not publish a takeover manifest: too much contention".into(),
    })
}

fn open_layers(
    buffer: &BufferStore,
    image_id: &str,
    m: Option<&Manifest>,
) -> Result<Vec<Arc<Layer>>> {
    let Some(m) = m else { return Ok(vec![]) };
    // Each layer costs a request or two to a remote store: open up to LAYER_OPEN_PARALLEL
    // at once (newest first, as the view wants them).
    let ids: Vec<&str> = m.layers.iter().rev().map(|l| l.blob_id.as_str()).collect();
    let mut layers = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(LAYER_OPEN_PARALLEL) {
        let opened: Vec<Result<Layer>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&id| s.spawn(move || open_layer(buffer, image_id, id)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("layer open panicked"))
                .collect()
        });
        for l in opened {
            layers.push(Arc::new(l?));
        }
    }
    Ok(layers)
}

pub fn open_layer(buffer: &BufferStore, image_id: &str, blob_id: &str) -> Result<Layer> {
    let wrap = |source| Error::Store {
        image: image_id.to_string(),
        source,
    };
    let reader = buffer
        .store
        .open_blob(&keys::blob_key(blob_id))
        .map_err(wrap)?;
    Layer::open(blob_id, reader).map_err(wrap)
}
