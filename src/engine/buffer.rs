//! The buffer store directory: locked by one process, one WAL per image, and the registry of
//! open sessions.

use super::layer::Layer;
use super::session::{Session, SessionConfig};
use super::{Error, Result};
use crate::catalog::keys;
use crate::store::ImageStore;
use fs2::FileExt;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const LOCK_FILE: &str = "mvps-buffer-store.lock";
pub const TMP_DIR: &str = "tmp";

/// How long to retry the directory lock. A lock can be held for a moment by a child process
/// forked (by anything in this process) between our close of the lock file and its exec.
const LOCK_RETRY_MS: u64 = 500;

fn lock_with_retry(f: &File) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(LOCK_RETRY_MS);
    loop {
        match f.try_lock_exclusive() {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

pub struct BufferStore {
    pub dir: PathBuf,
    _lock: File,
    pub store: Arc<dyn ImageStore>,
    pub cfg: SessionConfig,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl BufferStore {
    /// Locks `dir` for this process. A second process on the same directory gets an error.
    pub fn open(
        dir: &Path,
        store: Arc<dyn ImageStore>,
        cfg: SessionConfig,
    ) -> std::result::Result<BufferStore, String> {
        let d = dir.display();
        fs::create_dir_all(dir.join(TMP_DIR)).map_err(|e| format!("buffer store {d}: {e}"))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(|e| format!("buffer store {d}: cannot open lock file: {e}"))?;
        lock_with_retry(&lock).map_err(|_| {
            format!("buffer store {d} is in use by another mvps-te process (lock file {LOCK_FILE})")
        })?;
        for e in fs::read_dir(dir.join(TMP_DIR))
            .map_err(|e| format!("buffer store {d}: {e}"))?
            .flatten()
        {
            let _ = fs::remove_file(e.path());
        }
        Ok(BufferStore {
            dir: dir.to_path_buf(),
            _lock: lock,
            store,
            cfg,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// The file of WAL segment `segment` of `image_id`.
    pub fn wal_segment_path(&self, image_id: &str, segment: u64) -> PathBuf {
        super::wal::segment_path(&self.dir, image_id, segment)
    }

    /// Where WAL format 1 (one file per image, before segments) kept an image's log.
    pub fn legacy_wal_path(&self, image_id: &str) -> PathBuf {
        self.dir.join(format!("{image_id}.wal"))
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join(TMP_DIR)
    }

    /// The session of `image_id`, opened if needed, with one more connection attached.
    /// The caller must call `Session::detach` when its connection ends.
    pub fn attach(self: &Arc<Self>, image_id: &str, page_size_bits: u32) -> Result<Arc<Session>> {
        let mut sessions = self.sessions.lock().unwrap();
        if let Some(s) = sessions.get(image_id) {
            if s.page_size_bits != page_size_bits {
                return Err(Error::Refused {
                    image: image_id.into(),
                    why: format!(
                        "token page_size_bits {page_size_bits} does not match the image's {}",
                        s.page_size_bits
                    ),
                });
            }
            s.check_usable()?;
            s.attach();
            return Ok(s.clone());
        }
        // Opening reads the manifest and replays the WAL; holding the registry lock meanwhile
        // keeps two connections from opening the same image twice.
        // Opened with this connection attached already: its background threads never see
        // a new session as idle (and start closing or compacting it) before the first
        // client is in.
        let s = Session::open(self.clone(), image_id, page_size_bits)?;
        sessions.insert(image_id.to_string(), s.clone());
        Ok(s)
    }

    /// Removes `s` from the registry if it has no connections and nothing left to checkpoint.
    /// Returns true if it was removed (the caller then stops its background work).
    pub fn try_close_idle(&self, s: &Session) -> bool {
        let mut sessions = self.sessions.lock().unwrap();
        if s.connection_count() == 0 && s.buffer_is_empty() {
            sessions.remove(&s.image_id);
            s.mark_closed();
            return true;
        }
        false
    }

    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.lock().unwrap().values().cloned().collect()
    }

    /// Graceful stop (no connections left): checkpoint every open image until its WAL is
    /// empty, all in parallel, until `timeout`. Each image logs how its drain ended; what is
    /// left stays in its WAL, durable after `shutdown`.
    pub fn drain(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let sessions = self.sessions();
        std::thread::scope(|scope| {
            for s in &sessions {
                // Joined by the scope; a thread that cannot start leaves its image's WAL
                // for the next start, as a cut-short drain does.
                let started = std::thread::Builder::new()
                    .name(format!("drain-{}", s.image_id))
                    .spawn_scoped(scope, move || s.drain(deadline));
                if let Err(e) = started {
                    log::error!("image {}: cannot start its drain: {e}", s.image_id);
                }
            }
        });
    }

    /// Shutdown: stop background work, make every WAL durable.
    pub fn shutdown(&self) {
        let sessions: Vec<_> = self
            .sessions
            .lock()
            .unwrap()
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in sessions {
            s.shutdown();
        }
    }
}

/// Opens the layer blob `blob_id` of `image_id` from the image store (here rather than in
/// `open`, so that checkpoints and compactions need not import the session opener, which
/// starts their threads).
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
