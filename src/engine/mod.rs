//! The engine: sessions (one per open image), the buffer store (WALs), layers, manifests and
//! checkpoints. Storage-agnostic: it reaches the object store only through `store::ImageStore`.
//!
//! A session (`session.rs`) is made of three parts and two jobs over them:
//! - the log (`log.rs`): WAL segments, the index of buffered pages, append / flush / rotate;
//! - the version (`version.rs`): the newest manifest and its opened layers, and publishing
//!   the next manifest through the catalog;
//! - the transaction table (`txn.rs`), kept under the log's writer lock;
//! - the jobs (`jobs.rs`): checkpoint (`checkpoint.rs`, log → layers in a new version) and
//!   compaction (`compaction.rs`, version → a cheaper version, as `debt.rs` plans it).
//!
//! Reads (`read.rs`) resolve pages through the log, then the version; writes are paced by
//! the debt (`pace.rs`).
//!
//! # Lock order
//! Always taken in this order (a lock may be skipped, never taken out of order):
//! 1. a job's pass lock (`Job::one_at_a_time`): one checkpoint, one compaction pass at a
//!    time; held for the whole pass, never both by one thread;
//! 2. `Version::lock_publishing`: one manifest publication at a time;
//! 3. `Log::writer`: every change to the WAL, the change count and the transaction table;
//! 4. `Log::buffered`: what reads see of the log (segments, buffered pages);
//! 5. `Version`'s current manifest and layers;
//! 6. leaves, never held while taking another lock (but the debt under `drained`, when a
//!    paced writer looks again): `Session::drained`, the debt, the jobs' wake-up flags.
//!
//! Reads take 4 and then 5, briefly, one after the other, and copy with no lock held. The
//! slow parts of jobs (writing and uploading layers) hold only 1.

pub mod blob_file;
pub mod buffer;
pub mod checkpoint;
pub mod checksum;
pub mod compaction;
pub mod debt;
pub mod extent;
pub mod jobs;
pub mod layer;
pub mod log;
pub mod manifest;
pub mod open;
pub mod pace;
pub mod read;
pub mod scan;
pub mod session;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod txn;
pub mod version;
pub mod wal;

#[cfg(test)]
pub(crate) mod tests;

use std::fmt;

pub use buffer::BufferStore;
pub use session::{Session, SessionConfig};

pub(crate) use crate::fail_stop::exit_on_panic;

/// Errors of the engine layer; each names the image it concerns.
#[derive(Debug)]
pub enum Error {
    /// Local I/O on the buffer store failed.
    Io {
        image: String,
        op: &'static str,
        source: std::io::Error,
    },
    /// The image store failed (after its own retries).
    Store {
        image: String,
        source: crate::store::Error,
    },
    /// A manifest could not be read or is invalid.
    Manifest {
        image: String,
        source: manifest::ManifestError,
    },
    /// Another buffer store wrote a newer manifest: this one no longer owns the image.
    Fenced { image: String },
    /// The image cannot be opened as asked (page size mismatch, foreign WAL, ...).
    Refused { image: String, why: String },
    /// A request the engine cannot serve (out of range after validation, too large).
    Invalid { image: String, why: String },
    /// Optimistic concurrency: something committed since BEGIN, or the transaction lost the
    /// write lock to its timeout. The client should roll back and retry.
    Conflict { image: String, why: String },
    /// A transaction grew past `txn_bytes_max`.
    TxnTooLarge { image: String, max: u64 },
    /// The server is shutting down or the session closed.
    ShuttingDown { image: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { image, op, source } => write!(f, "image {image}: {op}: {source}"),
            Error::Store { image, source } => write!(f, "image {image}: {source}"),
            Error::Manifest { image, source } => write!(f, "image {image}: {source}"),
            Error::Fenced { image } => write!(
                f,
                "image {image}: fenced: another buffer store wrote a newer manifest; this server \
                 no longer writes the image (its WAL is kept for inspection)"
            ),
            Error::Refused { image, why } => write!(f, "image {image}: {why}"),
            Error::Invalid { image, why } => write!(f, "image {image}: {why}"),
            Error::Conflict { image, why } => {
                write!(f, "image {image}: transaction conflict: {why}")
            }
            Error::TxnTooLarge { image, max } => {
                write!(
                    f,
                    "image {image}: transaction larger than {max} bytes: its writes are \
                     discarded and COMMIT fails; ROLLBACK to end it"
                )
            }
            Error::ShuttingDown { image } => write!(f, "image {image}: shutting down"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
