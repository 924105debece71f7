//! The local-directory image store: the same keys as files under a root directory.
//!
//! Durability: an object's data is fsynced in a temp file before it is renamed (or, for a
//! conditional create, `link(2)`ed) into place, and the parent directory is fsynced after.
//! `link(2)` fails with EEXIST when the key exists, which is our create-if-absent.

use super::{BlobReader, CreateOutcome, Error, ImageStore, ObjectInfo, Result};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

const TMP_DIR: &str = ".tmp";

pub struct LocalStore {
    root: PathBuf,
    tmp_counter: AtomicU64,
}

fn io_err<'a>(key: &'a str, op: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| {
        if source.kind() == io::ErrorKind::NotFound {
            Error::NotFound {
                key: key.to_string(),
            }
        } else {
            Error::Io {
                key: key.to_string(),
                op,
                source,
            }
        }
    }
}

/// Keys may only be made of safe path components: no `..`, no absolute paths, no empties.
fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty() && key.split('/').all(super::keys::is_valid_key_component);
    if ok {
        Ok(())
    } else {
        Err(Error::BadKey {
            key: key.to_string(),
        })
    }
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl LocalStore {
    /// Opens (creating if needed) a store rooted at `root`, and checks it is writable.
    pub fn open(root: &Path) -> Result<LocalStore> {
        let key = root.display().to_string();
        fs::create_dir_all(root.join(TMP_DIR)).map_err(io_err(&key, "create directory"))?;
        let store = LocalStore {
            root: root.to_path_buf(),
            tmp_counter: AtomicU64::new(0),
        };
        // Leftover temp files are from writes that never completed; they were never visible.
        if let Ok(entries) = fs::read_dir(root.join(TMP_DIR)) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let probe = store.tmp_path();
        File::create(&probe).map_err(io_err(&key, "write probe file"))?;
        let _ = fs::remove_file(&probe);
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(TMP_DIR)
            .join(format!("{}-{}", std::process::id(), n))
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Writes `data` to a fresh temp file and fsyncs it.
    fn write_tmp(&self, key: &str, data: &[u8]) -> Result<PathBuf> {
        let tmp = self.tmp_path();
        let mut f = File::create(&tmp).map_err(io_err(key, "create temp file"))?;
        f.write_all(data).map_err(io_err(key, "write temp file"))?;
        f.sync_all().map_err(io_err(key, "fsync temp file"))?;
        Ok(tmp)
    }

    fn ensure_parent(&self, key: &str, path: &Path) -> Result<PathBuf> {
        let parent = path.parent().expect("keys have a parent").to_path_buf();
        fs::create_dir_all(&parent).map_err(io_err(key, "create directory"))?;
        Ok(parent)
    }

    fn install_tmp(&self, key: &str, tmp: &Path) -> Result<()> {
        let path = self.path_of(key)?;
        let parent = self.ensure_parent(key, &path)?;
        fs::rename(tmp, &path).map_err(io_err(key, "rename into place"))?;
        fsync_dir(&parent).map_err(io_err(key, "fsync directory"))
    }

    fn list_dir(&self, dir_key: &str, name_prefix: &str, out: &mut Vec<ObjectInfo>) -> Result<()> {
        let dir = if dir_key.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_key)
        };
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(Error::Io {
                    key: dir_key.to_string(),
                    op: "list",
                    source: e,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(io_err(dir_key, "list"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_DIR) || !name.starts_with(name_prefix) {
                continue;
            }
            let key = format!("{dir_key}{name}");
            let meta = entry.metadata().map_err(io_err(&key, "stat"))?;
            if meta.is_dir() {
                self.list_dir(&format!("{key}/"), "", out)?;
            } else {
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
                out.push(ObjectInfo {
                    key,
                    size_bytes: meta.len(),
                    last_modified_unix: mtime.map(|d| d.as_secs()).unwrap_or(0),
                });
            }
        }
        Ok(())
    }
}

struct LocalBlob {
    file: File,
    /// Where it was opened, to open it again for a direct-I/O pass (`stream`).
    path: PathBuf,
    size: u64,
    key: String,
}

impl BlobReader for LocalBlob {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| Error::Io {
                key: self.key.clone(),
                op: "read",
                source,
            })
    }
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn stream(&self) -> Option<Box<dyn super::BlobStream + '_>> {
        let s = super::direct_read::DirectStream::open(&self.path, &self.key, self)?;
        Some(Box::new(s))
    }
}

impl ImageStore for LocalStore {
    fn get(&self, key: &str) -> Result<Vec<u8>> {
        fs::read(self.path_of(key)?).map_err(io_err(key, "read"))
    }

    fn open_blob(&self, key: &str) -> Result<Box<dyn BlobReader>> {
        let path = self.path_of(key)?;
        let file = File::open(&path).map_err(io_err(key, "open"))?;
        let size = file.metadata().map_err(io_err(key, "stat"))?.len();
        Ok(Box::new(LocalBlob {
            file,
            path,
            size,
            key: key.to_string(),
        }))
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.path_of(key)?;
        let tmp = self.write_tmp(key, data)?;
        let r = self.install_tmp(key, &tmp);
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    }

    fn put_file(&self, key: &str, src: &Path) -> Result<()> {
        self.path_of(key)?;
        let tmp = self.tmp_path();
        // A hard link shares the (already fsynced by the caller or by us below) inode: no copy.
        if fs::hard_link(src, &tmp).is_err() {
            fs::copy(src, &tmp).map_err(io_err(key, "copy into store"))?;
        }
        let f = File::open(&tmp).map_err(io_err(key, "open"))?;
        f.sync_all().map_err(io_err(key, "fsync"))?;
        drop_cached(&f);
        let r = self.install_tmp(key, &tmp);
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    }

    fn create_if_absent(&self, key: &str, data: &[u8]) -> Result<CreateOutcome> {
        let path = self.path_of(key)?;
        let parent = self.ensure_parent(key, &path)?;
        let tmp = self.write_tmp(key, data)?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                fsync_dir(&parent).map_err(io_err(key, "fsync directory"))?;
                Ok(CreateOutcome::Created)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(CreateOutcome::AlreadyExists),
            Err(e) => Err(Error::Io {
                key: key.to_string(),
                op: "link into place",
                source: e,
            }),
        }
    }

    fn list(&self, prefix: &str, limit: Option<usize>) -> Result<Vec<ObjectInfo>> {
        let (dir_key, name_prefix) = match prefix.rfind('/') {
            Some(i) => (&prefix[..=i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        if !dir_key.is_empty() {
            check_key(dir_key.trim_end_matches('/'))?;
        }
        let mut out = Vec::new();
        self.list_dir(dir_key, name_prefix, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(n) = limit {
            out.truncate(n);
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        match fs::remove_file(self.path_of(key)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Io {
                key: key.to_string(),
                op: "delete",
                source: e,
            }),
        }
    }

    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }
}

/// Tells the kernel that a written, fsynced file's cached pages are not needed soon, so it
/// frees them now rather than when memory runs short.
///
/// `put_file` adopts the file it is given (a hard link; layer blobs from checkpoints and
/// compaction). Such a blob is read back only by a later cache miss, and during a long write
/// burst the checkpoints write hundreds of MB per second of them. Left cached, they fill the page cache with data nobody is about to
/// read and every new WAL page must come from memory not yet in use, which costs more than
/// reusing freed pages — a sustained sequential write ran at a third of the rate
/// (docs/PERFORMANCE.md). The pages must be clean for the kernel to drop them: call this
/// after the fsync. Advice only: on failure the pages simply stay cached.
fn drop_cached(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; it touches no user memory.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `file` in the page cache, via `mincore` on a shared mapping.
    fn resident_pages(file: &File, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: maps `len` bytes of an open file read-only, asks which pages are resident
        // into a vector of one byte per page, and unmaps; no mapped byte is dereferenced.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
        }
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        s.put("blobs/a.mvps-blob", b"hello").unwrap();
        s.put("images/x.mvps-image/1.json", b"{}").unwrap();
        s.put("images/x.mvps-image/0.json", b"{}").unwrap();
        assert_eq!(s.get("blobs/a.mvps-blob").unwrap(), b"hello");
        let l = s.list("images/x.mvps-image/", None).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].key, "images/x.mvps-image/0.json");
        assert_eq!(s.list("images/", Some(1)).unwrap().len(), 1);
        assert_eq!(s.list("", None).unwrap().len(), 3);
        let b = s.open_blob("blobs/a.mvps-blob").unwrap();
        let mut buf = [0u8; 3];
        b.read_at(1, &mut buf).unwrap();
        assert_eq!(&buf, b"ell");
        s.delete("blobs/a.mvps-blob").unwrap();
        s.delete("blobs/a.mvps-blob").unwrap();
        assert!(matches!(
            s.get("blobs/a.mvps-blob"),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn create_if_absent_fences() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        assert_eq!(
            s.create_if_absent("images/i/1.json", b"a").unwrap(),
            CreateOutcome::Created
        );
        assert_eq!(
            s.create_if_absent("images/i/1.json", b"b").unwrap(),
            CreateOutcome::AlreadyExists
        );
        assert_eq!(s.get("images/i/1.json").unwrap(), b"a");
    }

    #[test]
    fn bad_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        for k in ["../x", "/etc/passwd", "a//b", "a/./b", ".tmp/x", ""] {
            assert!(matches!(s.put(k, b"x"), Err(Error::BadKey { .. })), "{k}");
        }
    }

    #[test]
    fn drop_cached_frees_a_synced_files_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = 4 << 20;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.write_all(&vec![7u8; len]).unwrap();
        file.sync_all().unwrap();
        let before = resident_pages(&file, len);
        assert!(
            before > len / 4096 / 2,
            "only {before} pages cached after writing"
        );
        drop_cached(&file);
        let after = resident_pages(&file, len);
        assert!(
            after < before / 10,
            "{after} of {before} pages still cached"
        );
        // The data is on disk, not lost with the pages.
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 7));
    }
}
