//! The NBD protocol: fixed-newstyle handshake ([`handshake`]) and transmission
//! ([`transmission`]). This module parses and validates frames and nothing else; it reaches
//! the engine only through the [`Exports`] and [`Export`] traits.

pub mod consts;
pub mod handshake;
pub mod stream;
pub mod transmission;

use crate::engine;

/// Shuts a connection's socket down from another thread.
pub type Kill = std::sync::Arc<dyn Fn() + Send + Sync>;

/// Why the handshake refuses an export name: the option error reply to send and a message
/// (sent to the client and logged; it never contains the token).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reply: u32,
    pub message: String,
}

/// What an export looks like before it is opened (NBD_OPT_INFO).
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    pub size: u64,
    pub preferred_block_size: u32,
}

/// Export names → exports.
pub trait Exports: Send + Sync {
    fn describe(&self, name: &[u8]) -> Result<ExportInfo, Refusal>;
    /// Opens the export for one connection; dropping the returned handle detaches it.
    /// `kill` shuts the connection's socket down (used to replace it, client_id fencing).
    fn open(&self, name: &[u8], peer: &str, kill: Kill) -> Result<Box<dyn Export>, Refusal>;
}

/// One connection's view of an open export. Ranges are validated before these are called.
pub trait Export: Send + Sync {
    fn info(&self) -> ExportInfo;
    /// A short label for logs: image id and connection number.
    fn label(&self) -> &str;
    fn read(&self, offset: u64, buf: &mut [u8]) -> engine::Result<()>;
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> engine::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> engine::Result<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> engine::Result<()>;
    fn flush(&self) -> engine::Result<()>;
    /// The transactional extension (commands 64–67). Runs with no other request of this
    /// connection in flight.
    fn transaction(&self, cmd: TxnCommand) -> engine::Result<()>;
}

/// The transactional extension's commands (DESIGN §6, docs/PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnCommand {
    Begin,
    Commit,
    Rollback,
    Lock,
}

/// The one place engine errors become NBD error values.
pub fn errno_for(e: &engine::Error) -> u32 {
    use consts::*;
    match e {
        engine::Error::Invalid { .. } => NBD_EINVAL,
        engine::Error::ShuttingDown { .. } => NBD_ESHUTDOWN,
        engine::Error::Refused { .. } | engine::Error::Conflict { .. } => NBD_EPERM,
        engine::Error::TxnTooLarge { .. } => NBD_ENOSPC,
        engine::Error::Io { source, .. } if source.raw_os_error() == Some(28) => NBD_ENOSPC,
        engine::Error::Io { .. }
        | engine::Error::Store { .. }
        | engine::Error::Manifest { .. }
        | engine::Error::Fenced { .. } => NBD_EIO,
    }
}
