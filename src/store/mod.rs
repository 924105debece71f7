//! The image store: a narrow object-store trait. Everything above it is storage-agnostic.
//!
//! Keys are relative to the store's root (a directory, or an S3 bucket + prefix) and use the
//! layout in [`crate::catalog::keys`] (re-exported here as `store::keys`). Objects are immutable once written, except that a blob may be written
//! again with identical content after a retry.

pub mod cache;
pub use crate::catalog::keys;
pub mod direct_read;
pub mod disk_cache;
pub mod local;
pub mod stream;

use std::fmt;
use std::path::Path;

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the store root.
    pub key: String,
    pub size_bytes: u64,
    /// Seconds since the Unix epoch (0 when the store cannot tell).
    pub last_modified_unix: u64,
}

/// A multipart upload in progress (S3): invisible in listings, billed until completed or
/// aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadInfo {
    /// Key relative to the store root.
    pub key: String,
    pub upload_id: String,
    /// Seconds since the Unix epoch (0 when the store cannot tell).
    pub initiated_unix: u64,
}

/// Outcome of a conditional create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// We wrote the object.
    Created,
    /// An object already existed under the key; ours was not written.
    AlreadyExists,
}

/// Errors of the store layer. Each carries the key it concerns.
#[derive(Debug)]
pub enum Error {
    /// The object does not exist.
    NotFound { key: String },
    /// Local I/O failed.
    Io {
        key: String,
        op: &'static str,
        source: std::io::Error,
    },
    /// The remote store answered with an error that retrying will not fix.
    Remote { key: String, message: String },
    /// The remote store could not be reached or kept failing after retries.
    Unavailable { key: String, message: String },
    /// A key was refused before it reached a path or a URL.
    BadKey { key: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound { key } => write!(f, "object {key}: not found"),
            Error::Io { key, op, source } => write!(f, "object {key}: {op}: {source}"),
            Error::Remote { key, message } => write!(f, "object {key}: {message}"),
            Error::Unavailable { key, message } => {
                write!(f, "object {key}: store unavailable: {message}")
            }
            Error::BadKey { key } => write!(f, "refused object key {key:?}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Random access to one immutable object, opened once and read many times (layer blobs).
pub trait BlobReader: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn size_bytes(&self) -> u64;
    /// A hint that `[offset, offset + len)` will be read soon, on behalf of `scan`: a caching
    /// reader fetches it ahead in the background, within its readahead budget. Returns false
    /// if the budget stopped it short (worth asking again once the scan has read some of
    /// it). Readers without a cache have nothing to do.
    fn prefetch(&self, offset: u64, len: u64, scan: &cache::ScanWindow) -> bool {
        let _ = (offset, len, scan);
        true
    }
    /// Reads `buf` again from the object store itself, past any cache, whose copies of the
    /// range are dropped: bytes read before failed a check above the reader (a layer's page
    /// CRCs). Readers without a cache read again.
    fn refetch(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(offset, buf)
    }
    /// A reader for one pass over the blob in ascending offsets (a merge reading its input
    /// layers), where the store has a cheaper way to do that than `read_at`; None where it
    /// has not.
    fn stream(&self) -> Option<Box<dyn BlobStream + '_>> {
        None
    }
}

/// One pass over a blob, mostly in ascending offsets (see [`BlobReader::stream`]). Reading
/// backwards is allowed, only slower.
pub trait BlobStream {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// The object store. Implementations: [`local::LocalStore`] and `s3::S3Store`.
pub trait ImageStore: Send + Sync {
    /// Whole object.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Opens an immutable object for ranged reads.
    fn open_blob(&self, key: &str) -> Result<Box<dyn BlobReader>>;
    /// Its blob readers fetch ahead (`BlobReader::prefetch`): worth telling them what an
    /// image scan will read next. A local directory reads at disk speed and does not.
    fn reads_ahead(&self) -> bool {
        false
    }
    /// Writes an object (unconditionally); durable when this returns.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Writes an object from a local file; durable when this returns. The file is left alone.
    fn put_file(&self, key: &str, path: &Path) -> Result<()>;
    /// Creates the object only if no object exists under `key` (the fencing primitive).
    fn create_if_absent(&self, key: &str, data: &[u8]) -> Result<CreateOutcome>;
    /// Objects whose key starts with `prefix`, in ascending key order, at most `limit` of them.
    fn list(&self, prefix: &str, limit: Option<usize>) -> Result<Vec<ObjectInfo>>;
    /// Deletes an object; deleting a missing object is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Deletes many objects (missing ones are not an error). The default deletes them one by
    /// one; S3 sends DeleteObjects batches.
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        keys.iter().try_for_each(|k| self.delete(k))
    }
    /// Multipart uploads in progress under the store's root; stores without them have none.
    fn list_uploads(&self) -> Result<Vec<UploadInfo>> {
        Ok(Vec::new())
    }
    /// Aborts an upload from [`ImageStore::list_uploads`]; one already gone is not an error.
    fn abort_upload(&self, upload: &UploadInfo) -> Result<()> {
        let _ = upload;
        Ok(())
    }
    /// Requests sent so far, when the store counts them (S3), for reports and benchmarks.
    fn requests_sent(&self) -> Option<u64> {
        None
    }
    /// A short description for logs ("local:/var/lib/mvps/image-store", "s3://bucket/prefix").
    fn describe(&self) -> String;
}
