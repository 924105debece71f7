//! Conformance harness: starts real `mvps-te` processes and drives real NBD clients.
//!
//! - [`bins`]: finds (and if needed builds) the workspace binaries.
//! - [`server`]: one `mvps-te` process on a free port or unix socket with its own temp data
//!   dir; kill -9, SIGTERM, restart on the same data dir; its stderr kept for assertions.
//! - [`token`]: export-name tokens, good and deliberately bad.
//! - [`nbd`]: a minimal raw NBD client for protocol and bad-input tests.
//! - [`faultproxy`]: an HTTP proxy in front of an S3 endpoint that injects failures.
//! - [`fs`]: qemu-storage-daemon FUSE export of a device, and a loop mount of it.
//! - [`manifest`]: an image's manifests, to tell when data is checkpointed.
//! - [`tools`]: runs external programs (qemu-io, nbdinfo, fio, ...) with a timeout.
//!
//! Tests that move a lot of data take [`tools::heavy`] so that at most one of them runs at a
//! time on the machine (CI has two cores).

pub mod bins;
pub mod faultproxy;
pub mod fs;
pub mod manifest;
pub mod nbd;
pub mod server;
pub mod token;
pub mod tools;
