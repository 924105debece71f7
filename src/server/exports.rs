//! Glue between the protocol and the engine: export names are tokens, verified here; an open
//! export is one connection attached to the image's session.

use super::fence::{ClientFence, Done, Kill};
use crate::auth::{self, Claims};
use crate::engine::txn::Txn;
use crate::engine::{self, BufferStore, Session};
use crate::nbd::consts::*;
use crate::nbd::{Export, ExportInfo, Exports, Refusal, TxnCommand};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct EngineExports {
    pub buffer: Arc<BufferStore>,
    pub secret: Vec<u8>,
    next_conn: AtomicU64,
    clients: Arc<ClientFence>,
}

impl EngineExports {
    pub fn new(buffer: Arc<BufferStore>, secret: Vec<u8>) -> EngineExports {
        EngineExports {
            buffer,
            secret,
            next_conn: AtomicU64::new(1),
            clients: Arc::new(ClientFence::default()),
        }
    }

    fn verify(&self, name: &[u8]) -> Result<Claims, Refusal> {
        let token = std::str::from_utf8(name).map_err(|_| Refusal {
            reply: NBD_REP_ERR_POLICY,
            message: "export name is not a token".into(),
        })?;
        auth::verify(token, &self.secret).map_err(|e| Refusal {
            reply: NBD_REP_ERR_POLICY,
            message: format!("token refused: {e}"),
        })
    }
}

fn info_of(c: &Claims) -> ExportInfo {
    ExportInfo {
        size: c.image_size,
        preferred_block_size: 1 << c.page_size_bits,
    }
}

impl Exports for EngineExports {
    fn describe(&self, name: &[u8]) -> Result<ExportInfo, Refusal> {
        let c = self.verify(name)?;
        Ok(info_of(&c))
    }

    fn open(&self, name: &[u8], peer: &str, kill: Kill) -> Result<Box<dyn Export>, Refusal> {
        let claims = self
            .verify(name)
            .inspect_err(|r| log::warn!("{peer}: {}", r.message))?;
        let n = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let label = format!("image {} conn {n}", claims.image_id);
        let fence = match &claims.client_id {
            Some(id) => {
                let key = (claims.image_id.clone(), id.clone());
                let done = self
                    .clients
                    .claim(key.clone(), n, kill)
                    .map_err(|message| {
                        log::error!("{label}: {message}");
                        Refusal {
                            reply: NBD_REP_ERR_UNKNOWN,
                            message,
                        }
                    })?;
                Some(FenceSlot {
                    fence: self.clients.clone(),
                    key,
                    conn: n,
                    done,
                })
            }
            None => None,
        };
        let session = self
            .buffer
            .attach(&claims.image_id, claims.page_size_bits)
            .map_err(|e| {
                log::error!("{peer}: cannot open: {e}");
                let reply = match e {
                    engine::Error::ShuttingDown { .. } => NBD_REP_ERR_SHUTDOWN,
                    engine::Error::Refused { .. } | engine::Error::Fenced { .. } => {
                        NBD_REP_ERR_POLICY
                    }
                    _ => NBD_REP_ERR_UNKNOWN,
                };
                Refusal {
                    reply,
                    message: e.to_string(),
                }
            })?;
        log::info!("{label}: connected from {peer}, size {}", claims.image_size);
        let txn = Mutex::new(None);
        Ok(Box::new(ConnectionExport {
            info: info_of(&claims),
            session,
            label,
            txn,
            fence,
        }))
    }
}

/// A connection's claim on its client_id; released (and marked done) when it ends.
struct FenceSlot {
    fence: Arc<ClientFence>,
    key: (String, String),
    conn: u64,
    done: Arc<Done>,
}

impl Drop for FenceSlot {
    fn drop(&mut self) {
        self.fence.release(&self.key, self.conn, &self.done);
    }
}

/// One connection's handle on a session, with its open transaction, if any.
pub struct ConnectionExport {
    info: ExportInfo,
    session: Arc<Session>,
    label: String,
    txn: Mutex<Option<Txn>>,
    /// Dropped last (after the rollback and detach below), which tells a replacing
    /// connection that this one is fully gone.
    fence: Option<FenceSlot>,
}

impl Drop for ConnectionExport {
    fn drop(&mut self) {
        if let Some(t) = self.txn.lock().unwrap().take() {
            log::info!(
                "{}: disconnected with a transaction open; rolled back",
                self.label
            );
            self.session.rollback(t);
        }
        log::info!("{}: disconnected", self.label);
        self.session.detach();
        drop(self.fence.take());
    }
}

impl ConnectionExport {
    /// Runs a write inside the open transaction, or as a plain write. The connection's
    /// transaction slot is held only while a transaction is open: plain writes of one
    /// connection run concurrently. (Transaction commands are barriers, so the slot cannot
    /// change while plain writes are in flight.)
    fn with_txn(
        &self,
        f: impl FnOnce(&Session, Option<&mut Txn>) -> engine::Result<()>,
    ) -> engine::Result<()> {
        let mut slot = self.txn.lock().unwrap();
        match slot.as_mut() {
            Some(t) => f(&self.session, Some(t)),
            None => {
                drop(slot);
                f(&self.session, None)
            }
        }
    }

    fn misuse(&self, why: &str) -> engine::Error {
        engine::Error::Invalid {
            image: self.session.image_id.clone(),
            why: why.to_string(),
        }
    }
}

impl Export for ConnectionExport {
    fn info(&self) -> ExportInfo {
        self.info
    }
    fn label(&self) -> &str {
        &self.label
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> engine::Result<()> {
        let txn = self.txn.lock().unwrap();
        match txn.as_ref() {
            Some(t) => self.session.read(Some(t), offset, buf),
            None => {
                drop(txn);
                self.session.read(None, offset, buf)
            }
        }
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> engine::Result<()> {
        self.with_txn(|s, txn| s.write(txn, offset, data))?;
        if fua {
            self.session.flush()?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> engine::Result<()> {
        self.with_txn(|s, txn| s.write_zeroes(txn, offset, len, no_hole))?;
        if fua {
            self.session.flush()?;
        }
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> engine::Result<()> {
        // Trimmed pages read as zeros (DESIGN §2), so TRIM is a hole-punching zero.
        self.write_zeroes(offset, len, false, fua)
    }
    fn flush(&self) -> engine::Result<()> {
        self.session.flush()
    }
    fn transaction(&self, cmd: TxnCommand) -> engine::Result<()> {
        let mut slot = self.txn.lock().unwrap();
        match (cmd, slot.take()) {
            (TxnCommand::Begin, None) => {
                *slot = Some(self.session.begin()?);
                Ok(())
            }
            (TxnCommand::Begin, Some(t)) => {
                *slot = Some(t);
                Err(self.misuse("BEGIN_TXN with a transaction already open"))
            }
            (TxnCommand::Commit, Some(t)) => self.session.commit(t),
            (TxnCommand::Rollback, Some(t)) => {
                self.session.rollback(t);
                Ok(())
            }
            (TxnCommand::Lock, Some(mut t)) => {
                let r = self.session.lock(&mut t);
                *slot = Some(t);
                r
            }
            (_, None) => Err(self.misuse("no transaction is open")),
        }
    }
}
