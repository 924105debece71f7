//! mvps: a log-structured, transactional virtual block device served over NBD.
//!
//! Layers, from the wire inwards:
//! - [`nbd`]: the NBD protocol (handshake, transmission), nothing else.
//! - [`engine`]: sessions, the buffer store (WAL), layers, manifests, checkpoints.
//! - [`catalog`]: object keys and ids, the manifest and gc-mark formats, and publishing a
//!   manifest; shared by the engine, `mvps-s3-gc` and `mvpsctl`.
//! - [`store`]: the narrow object-store trait and its local-directory implementation.
//! - [`s3`]: the S3 implementation of that trait.
//! - [`auth`]: JWT export names.

pub mod auth;
pub mod catalog;
pub mod client;
pub mod config;
pub mod engine;
pub mod fail_stop;
pub mod limits;
pub mod memory;
pub mod nbd;
pub mod s3;
pub mod server;
pub mod store;
