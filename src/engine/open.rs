//! Opening a session: manifest + WAL → index and layers, with the writer-id ownership rules of
//! DESIGN §4:
//! - WAL and newest manifest written by the same buffer store: resume.
//! - no WAL: take over: a new writer id, and a fenced manifest g+1 naming it.
//! - a WAL whose writer differs from the newest manifest's: refuse, naming both ids.

use super::buffer::open_layer;
use super::buffer::BufferStore;
use super::checkpoint;
use super::extent::ExtentMap;
use super::layer::Layer;
use super::log::{BufVal, Buffered, Log, LogWriter};
use super::manifest::{self, writer_id_hex, Manifest, Newest};
use super::session::Session;
use super::version::Version;
use super::wal::{self, WalFile, WalHeader};
use super::{Error, Result};
use crate::catalog::keys;
use crate::catalog::{self, Conflict, Edit, Outcome};
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

/// Layers opened at once when a session opens (each is one or two ranged GETs on S3).
const LAYER_OPEN_PARALLEL: usize = 16;

impl Session {
    /// Opens the session of `image_id` with one connection attached (the caller's).
    pub fn open(
        buffer: Arc<BufferStore>,
        image_id: &str,
        page_size_bits: u32,
    ) -> Result<Arc<Session>> {
        let image = image_id.to_string();
        let store = buffer.store.clone();
        let newest =
            manifest::load_newest(store.as_ref(), image_id).map_err(|source| Error::Manifest {
                image: image.clone(),
                source,
            })?;
        if !newest.cut_short.is_empty() {
            log::warn!(
                "image {image_id}: skipping {} cut-short manifest object(s) {:?} (a manifest \
                 PUT interrupted before its body arrived; never acknowledged, so what it would \
                 have published is still in its writer's WAL); using generation {}, the next \
                 manifest is generation {}",
                newest.cut_short.len(),
                newest.cut_short,
                newest.manifest.as_ref().map(|m| m.generation).unwrap_or(0),
                newest.next_generation()
            );
        }
        if let Some(m) = &newest.manifest {
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
        let opened = if segments.is_empty() {
            take_over(&buffer, image_id, page_size_bits, newest)?
        } else {
            resume(&buffer, image_id, page_size_bits, newest, &segments)?
        };
        let layers = open_layers(&buffer, image_id, opened.manifest.as_ref())?;
        let buffered = Buffered {
            segments: opened.files,
            index: opened.index,
        };
        let log = Log::new(image_id, page_size_bits, opened.writer, buffered);
        let version = Version::new(image_id, opened.manifest, layers);
        let s = Arc::new(Session::new(buffer, image_id, page_size_bits, log, version));
        s.attach(); // the opener's connection (see BufferStore::attach)
                    // No thread, no session: this connection gets the error, the server goes on.
        let started =
            checkpoint::start_thread(&s).and_then(|()| super::compaction::start_thread(&s));
        if let Err(source) = started {
            s.shutdown(); // stops the thread that did start
            return Err(Error::Io {
                image,
                op: "start the checkpoint and compaction threads",
                source,
            });
        }
        Ok(s)
    }
}

/// What opening a session's WAL gives.
struct Opened {
    writer: LogWriter,
    /// The newest manifest (None: never published, uploads disabled).
    manifest: Option<Manifest>,
    /// The buffered pages.
    index: ExtentMap<BufVal>,
    /// Every segment file, by number.
    files: BTreeMap<u64, Arc<File>>,
}

/// `newest`: the newest complete manifest and the highest generation whose key exists
/// (above the manifest's when cut-short objects were skipped; see `manifest::Newest`).
fn resume(
    buffer: &BufferStore,
    image_id: &str,
    bits: u32,
    newest: Newest,
    segments: &[(u64, std::path::PathBuf)],
) -> Result<Opened> {
    let image = image_id.to_string();
    let taken = newest.taken_generation;
    let manifest = newest.manifest.clone();
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
    let mut o = Opened {
        writer: LogWriter {
            wal,
            next_seq: rec.next_seq,
            next_txn_id: rec.next_txn_id,
            change_count: rec.max_change_count.max(base),
            txns: Default::default(),
        },
        manifest,
        index,
        files,
    };
    if !buffer.cfg.disable_image_store_write {
        match &o.manifest {
            None => {
                // The store has no manifest (new or wiped store): publish the first one as
                // ours (generation 1, or above cut-short objects).
                let edit = Edit::TakeOver {
                    image_id: image.clone(),
                    page_size_bits: bits,
                    writer_id: o.writer.wal.header.writer_id,
                };
                publish_takeover(buffer, &mut o, &newest, &edit)?;
            }
            Some(m) if taken > m.generation => publish_bridge(buffer, &mut o, &newest)?,
            Some(_) => {}
        }
    }
    Ok(o)
}

/// Resuming on top of cut-short manifest objects (generations up to `taken`, above ours):
/// their keys are taken, so a checkpoint's `g+1` would fail as if fenced. Publish a copy of
/// our manifest above them (same layers and change count, conditional create) so that the
/// session's next manifest has a free generation. If another buffer store publishes a
/// manifest meanwhile, it has taken the image over: refuse, as for any foreign owner.
fn publish_bridge(buffer: &BufferStore, o: &mut Opened, newest: &Newest) -> Result<()> {
    let base = o.manifest.clone().expect("resumed from a manifest");
    let image = base.image_id.clone();
    let store = buffer.store.as_ref();
    let outcome = catalog::publish_next(store, newest, &Edit::Copy, Conflict::RetryWhileUnchanged)
        .map_err(|source| Error::Manifest {
            image: image.clone(),
            source,
        })?;
    match outcome {
        Outcome::Published(bridge) => {
            log::info!(
                "image {image}: resumed at manifest generation {} (a copy of generation {} \
                 above {} cut-short object(s))",
                bridge.generation,
                base.generation,
                bridge.generation - 1 - base.generation
            );
            o.manifest = Some(bridge);
            Ok(())
        }
        Outcome::Fenced { newest, .. } => Err(Error::Refused {
            image,
            why: format!(
                "while this buffer store ({}) was resuming from manifest generation {}, \
                 another one published generation {newest}: it took the image over. To serve \
                 the image here, move this buffer store's WAL segments aside (their \
                 un-checkpointed writes are then lost) and reconnect",
                base.writer_id, base.generation,
            ),
        }),
        Outcome::GaveUp { .. } => Err(Error::Refused {
            image,
            why: "could not publish a manifest above cut-short ones: too much contention".into(),
        }),
    }
}

/// Creates a new WAL with a fresh writer id and publishes a manifest naming it, at
/// generation `taken + 1` (`taken`: the highest generation whose key exists).
fn take_over(buffer: &BufferStore, image_id: &str, bits: u32, newest: Newest) -> Result<Opened> {
    let manifest = newest.manifest.clone();
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
    let mut o = Opened {
        writer: LogWriter {
            wal,
            next_seq: 1,
            next_txn_id: 1,
            change_count: base_cc,
            txns: Default::default(),
        },
        manifest,
        index: ExtentMap::new(),
        files: BTreeMap::new(),
    };
    o.files
        .insert(o.writer.wal.segment(), o.writer.wal.file.clone());
    if buffer.cfg.disable_image_store_write {
        log::info!(
            "image {image_id}: new writer {} (image store writes disabled)",
            writer_id_hex(writer_id)
        );
        return Ok(o);
    }
    let edit = Edit::TakeOver {
        image_id: image.clone(),
        page_size_bits: bits,
        writer_id,
    };
    let r = publish_takeover(buffer, &mut o, &newest, &edit);
    if r.is_err() {
        // Nothing was written to the WAL yet: remove it so a retry starts clean.
        let _ = std::fs::remove_file(&path);
    }
    r?;
    log::info!(
        "image {image_id}: took over as writer {} at manifest generation {}",
        writer_id_hex(writer_id),
        o.manifest.as_ref().map(|m| m.generation).unwrap_or(0)
    );
    Ok(o)
}

/// Publishes a takeover manifest (`edit`, on top of `newest`); if another writer races us
/// to that generation, re-reads the newest manifest and tries on top of it.
fn publish_takeover(
    buffer: &BufferStore,
    o: &mut Opened,
    newest: &Newest,
    edit: &Edit,
) -> Result<()> {
    let image = o.writer.wal.header.image_id.clone();
    let store = buffer.store.as_ref();
    let outcome =
        catalog::publish_next(store, newest, edit, Conflict::Rebase).map_err(|source| {
            Error::Manifest {
                image: image.clone(),
                source,
            }
        })?;
    match outcome {
        Outcome::Published(next) => {
            o.writer.change_count = o.writer.change_count.max(next.change_count);
            o.manifest = Some(next);
            Ok(())
        }
        Outcome::Fenced { .. } | Outcome::GaveUp { .. } => Err(Error::Refused {
            image,
            why: "could not publish a takeover manifest: too much contention".into(),
        }),
    }
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

/// Opening on top of manifest objects that a PUT cut short left behind (empty, or ending
/// mid-document): docs/FORMAT.md, *Cut-short manifest objects*.
#[cfg(test)]
mod tests {
    use super::super::tests::cfg;
    use super::*;
    use crate::store::local::LocalStore;
    use crate::store::{CreateOutcome, ImageStore, ObjectInfo};
    use std::path::Path;

    const IMAGE: &str = "model.mvps-image";
    const PAGE: usize = 4096;

    fn local(dir: &Path) -> Arc<dyn ImageStore> {
        Arc::new(LocalStore::open(&dir.join("images")).unwrap())
    }

    /// A session on a buffer store; closed (WAL synced, lock released) on drop, as at a
    /// server's shutdown.
    struct Opened {
        b: Arc<BufferStore>,
        s: Arc<Session>,
    }

    impl std::ops::Deref for Opened {
        type Target = Session;
        fn deref(&self) -> &Session {
            &self.s
        }
    }

    impl Drop for Opened {
        fn drop(&mut self) {
            self.b.shutdown();
        }
    }

    fn open(dir: &Path, buffer: &str, store: Arc<dyn ImageStore>) -> Result<Opened> {
        let b = Arc::new(BufferStore::open(&dir.join(buffer), store, cfg()).unwrap());
        let s = b.attach(IMAGE, 12)?;
        Ok(Opened { b, s })
    }

    fn manifest_of(s: &Session) -> Manifest {
        s.version.manifest().unwrap()
    }

    fn page(s: &Session, n: u64) -> Vec<u8> {
        let mut got = vec![0u8; PAGE];
        s.read(None, n * PAGE as u64, &mut got).unwrap();
        got
    }

    fn plant(store: &dyn ImageStore, generation: u64, bytes: &[u8]) -> String {
        let key = keys::manifest_key(IMAGE, generation);
        assert_eq!(
            store.create_if_absent(&key, bytes).unwrap(),
            CreateOutcome::Created
        );
        key
    }

    /// Page 0 checkpointed (generation 2), page 1 only in the WAL, then the session stops
    /// as if killed while creating generation 3: its object is left as `cut` bytes.
    fn crashed_checkpoint(dir: &Path, store: &Arc<dyn ImageStore>, cut: &[u8]) -> Manifest {
        let s = open(dir, "buffer", store.clone()).unwrap();
        s.write(None, 0, &[1u8; PAGE]).unwrap();
        s.checkpoint().unwrap();
        s.write(None, PAGE as u64, &[2u8; PAGE]).unwrap();
        let m = manifest_of(&s);
        assert_eq!(m.generation, 2);
        drop(s);
        plant(store.as_ref(), 3, cut);
        m
    }

    /// The incident: the newest manifest object is empty. The writer resumes from the
    /// previous manifest, replays what the lost checkpoint would have published from its WAL,
    /// and publishes above the empty object; nothing is lost, then or later.
    #[test]
    fn resume_over_a_cut_short_manifest_loses_nothing() {
        let whole = Manifest {
            format_version: manifest::MANIFEST_FORMAT_VERSION,
            image_id: IMAGE.into(),
            generation: 3,
            change_count: 9,
            writer_id: writer_id_hex(5),
            page_size_bits: 12,
            layers: vec![],
            created_at_unix: 0,
        };
        let full = whole.to_bytes();
        for cut in [&b""[..], &full[..40]] {
            let dir = tempfile::tempdir().unwrap();
            let store = local(dir.path());
            let before = crashed_checkpoint(dir.path(), &store, cut);
            let s = open(dir.path(), "buffer", store.clone()).unwrap();
            let bridge = manifest_of(&s);
            assert_eq!(bridge.generation, 4, "published above the cut-short object");
            assert_eq!(
                (&bridge.layers, bridge.change_count, &bridge.writer_id),
                (&before.layers, before.change_count, &before.writer_id)
            );
            assert_eq!(page(&s, 0), vec![1u8; PAGE]);
            assert_eq!(page(&s, 1), vec![2u8; PAGE], "WAL replayed");
            s.checkpoint().unwrap();
            assert_eq!(manifest_of(&s).generation, 5);
            drop(s);
            // Everything reached the image store: a new buffer store sees both pages.
            let s = open(dir.path(), "buffer2", store.clone()).unwrap();
            assert_eq!(manifest_of(&s).generation, 6);
            assert_eq!(page(&s, 0), vec![1u8; PAGE]);
            assert_eq!(page(&s, 1), vec![2u8; PAGE]);
        }
    }

    /// A new buffer store taking the image over publishes above the cut-short object too.
    #[test]
    fn takeover_over_a_cut_short_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let before = crashed_checkpoint(dir.path(), &store, b"");
        let s = open(dir.path(), "buffer2", store.clone()).unwrap();
        let m = manifest_of(&s);
        assert_eq!(m.generation, 4);
        assert_eq!(m.layers, before.layers);
        assert_ne!(m.writer_id, before.writer_id);
        assert_eq!(page(&s, 0), vec![1u8; PAGE]);
        assert_eq!(
            page(&s, 1),
            vec![0u8; PAGE],
            "the old buffer store's WAL is not ours"
        );
        drop(s);
        // The old buffer store is refused: the image has a new owner.
        let e = open(dir.path(), "buffer", store).err().unwrap().to_string();
        assert!(e.contains("owned by buffer store"), "{e}");
    }

    /// A newest manifest that is damaged (not cut short) is never skipped: open fails, naming
    /// the object, and the store is left as it was.
    #[test]
    fn a_damaged_newest_manifest_refuses_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        crashed_checkpoint(
            dir.path(),
            &store,
            b"{\"format_version\": 1, \"image_id\": 7}",
        );
        let key = keys::manifest_key(IMAGE, 3);
        for buffer in ["buffer", "buffer2"] {
            let e = open(dir.path(), buffer, store.clone())
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(&key) && e.contains("damaged"), "{e}");
        }
        let listed = store.list(&keys::manifest_prefix(IMAGE), None).unwrap();
        assert_eq!(listed.len(), 3, "{listed:?}");
    }

    /// Only a cut-short first manifest: the image was never published; a takeover starts it
    /// at generation 2.
    #[test]
    fn a_cut_short_first_manifest_is_no_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        plant(store.as_ref(), 1, b"");
        let s = open(dir.path(), "buffer", store.clone()).unwrap();
        let m = manifest_of(&s);
        assert_eq!((m.generation, m.change_count, m.layers.len()), (2, 0, 0));
        assert_eq!(page(&s, 0), vec![0u8; PAGE]);
        s.write(None, 0, &[3u8; PAGE]).unwrap();
        s.checkpoint().unwrap();
        assert_eq!(manifest_of(&s).generation, 3);
    }

    /// A store that, just before the first conditional create of `key`, lets another buffer
    /// store publish a complete manifest there (a takeover racing our resume).
    struct RacingStore {
        inner: Arc<dyn ImageStore>,
        key: String,
        theirs: std::sync::Mutex<Option<Vec<u8>>>,
    }

    impl ImageStore for RacingStore {
        fn get(&self, key: &str) -> crate::store::Result<Vec<u8>> {
            self.inner.get(key)
        }
        fn open_blob(&self, key: &str) -> crate::store::Result<Box<dyn crate::store::BlobReader>> {
            self.inner.open_blob(key)
        }
        fn put(&self, key: &str, data: &[u8]) -> crate::store::Result<()> {
            self.inner.put(key, data)
        }
        fn put_file(&self, key: &str, path: &Path) -> crate::store::Result<()> {
            self.inner.put_file(key, path)
        }
        fn create_if_absent(&self, key: &str, data: &[u8]) -> crate::store::Result<CreateOutcome> {
            if key == self.key {
                if let Some(theirs) = self.theirs.lock().unwrap().take() {
                    self.inner.create_if_absent(key, &theirs)?;
                }
            }
            self.inner.create_if_absent(key, data)
        }
        fn list(
            &self,
            prefix: &str,
            limit: Option<usize>,
        ) -> crate::store::Result<Vec<ObjectInfo>> {
            self.inner.list(prefix, limit)
        }
        fn delete(&self, key: &str) -> crate::store::Result<()> {
            self.inner.delete(key)
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    /// The bridge above a cut-short object is a conditional create like any manifest: if
    /// another buffer store publishes that generation first, resuming is refused.
    #[test]
    fn a_takeover_racing_the_bridge_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let before = crashed_checkpoint(dir.path(), &store, b"");
        let mut theirs = before.clone();
        theirs.generation = 4;
        theirs.writer_id = writer_id_hex(0xfeed);
        let racing: Arc<dyn ImageStore> = Arc::new(RacingStore {
            inner: store.clone(),
            key: keys::manifest_key(IMAGE, 4),
            theirs: std::sync::Mutex::new(Some(serde_json::to_vec_pretty(&theirs).unwrap())),
        });
        let e = open(dir.path(), "buffer", racing)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("took the image over"), "{e}");
        assert_eq!(
            manifest::load_latest(store.as_ref(), IMAGE).unwrap(),
            Some(theirs)
        );
    }
}
