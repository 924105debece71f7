//! The transmission phase: one reader thread per connection parses requests, validates them
//! (`validate`), and hands valid ones to the export's worker pool; replies are written under
//! one lock per socket and may come out of order, as the spec allows.
//!
//! Invalid requests get an error reply (a WRITE's payload is drained first); only a bad
//! request magic or an I/O failure ends the connection.

use super::consts::*;
use super::stream::Stream;
use super::{errno_for, Export, TxnCommand};
use crate::limits::{
    CONNECTION_IN_FLIGHT_BYTES_MAX, CONNECTION_IN_FLIGHT_MAX, REQUEST_PAYLOAD_BYTES_MAX,
};
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};

pub const REQUEST_SIZE: usize = 28;
pub const SIMPLE_REPLY_SIZE: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn parse_request(b: &[u8; REQUEST_SIZE]) -> Option<Request> {
    if u32::from_be_bytes(b[0..4].try_into().unwrap()) != NBD_REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
        kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    })
}

pub fn simple_reply_header(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_SIZE] {
    let mut h = [0u8; SIMPLE_REPLY_SIZE];
    h[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

/// Checks a request against the export size and our limits. `Err` is the NBD error to reply.
pub fn validate(r: &Request, size: u64) -> Result<(), u32> {
    let allowed_flags = match r.kind {
        NBD_CMD_READ => NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE | NBD_CMD_TRIM => NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        NBD_CMD_FLUSH | NBD_CMD_DISC => 0,
        NBD_CMD_MVPS_COMMIT_TXN => NBD_CMD_FLAG_FUA,
        NBD_CMD_MVPS_BEGIN_TXN | NBD_CMD_MVPS_ROLLBACK_TXN | NBD_CMD_MVPS_LOCK_TXN => 0,
        _ => return Err(NBD_EINVAL),
    };
    if r.flags & !allowed_flags != 0 {
        return Err(NBD_EINVAL);
    }
    let len = r.length as u64;
    let in_range = r.offset.checked_add(len).is_some_and(|end| end <= size);
    match r.kind {
        NBD_CMD_READ | NBD_CMD_WRITE if r.length > REQUEST_PAYLOAD_BYTES_MAX => Err(NBD_EOVERFLOW),
        NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES if !in_range => Err(NBD_ENOSPC),
        NBD_CMD_READ | NBD_CMD_TRIM if !in_range => Err(NBD_EINVAL),
        _ => Ok(()),
    }
}

/// Bounds what one connection holds in flight: request count and payload bytes. Only the
/// connection's reader thread ever waits on it.
struct InFlight {
    state: Mutex<InFlightState>,
    cv: Condvar,
}

struct InFlightState {
    count: usize,
    bytes: u64,
    /// Someone waits on `cv`: only then does `release` pay for a wake-up (a syscall).
    waiting: bool,
}

impl InFlight {
    fn new() -> InFlight {
        InFlight {
            state: Mutex::new(InFlightState {
                count: 0,
                bytes: 0,
                waiting: false,
            }),
            cv: Condvar::new(),
        }
    }
    fn acquire(&self, bytes: u64) {
        let mut g = self.state.lock().unwrap();
        // A single request larger than the byte budget still goes through, alone.
        while g.count >= CONNECTION_IN_FLIGHT_MAX
            || (g.count > 0 && g.bytes + bytes > CONNECTION_IN_FLIGHT_BYTES_MAX)
        {
            g.waiting = true;
            g = self.cv.wait(g).unwrap();
        }
        g.count += 1;
        g.bytes += bytes;
    }
    fn release(&self, bytes: u64) {
        let mut g = self.state.lock().unwrap();
        g.count -= 1;
        g.bytes -= bytes;
        if g.waiting {
            g.waiting = false;
            self.cv.notify_all();
        }
    }
    fn wait_idle(&self) {
        let mut g = self.state.lock().unwrap();
        while g.count > 0 {
            g.waiting = true;
            g = self.cv.wait(g).unwrap();
        }
    }
}

/// WRITE payload buffers a connection keeps for reuse, and the largest one kept. A fresh
/// 1 MiB buffer per request costs a page fault per 4 KiB (and zeroing); a reused one costs
/// neither. Bounded: at most this many, each at most this big.
const PAYLOAD_BUFFERS_KEPT_MAX: usize = 16;
const PAYLOAD_BUFFER_KEEP_BYTES: usize = 4 << 20;

/// A WRITE payload: the first `len` bytes of `buf` (which may be longer: it is reused).
struct Payload {
    buf: Vec<u8>,
    len: usize,
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

struct Conn {
    export: Box<dyn Export>,
    out: Mutex<Stream>,
    in_flight: InFlight,
    payload_buffers: Mutex<Vec<Vec<u8>>>,
}

impl Conn {
    /// A buffer with at least `len` initialized bytes, reused when one is free.
    fn payload_buffer(&self, len: usize) -> Payload {
        let mut buf = self
            .payload_buffers
            .lock()
            .unwrap()
            .pop()
            .unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        Payload { buf, len }
    }
    fn recycle(&self, p: Payload) {
        if p.buf.len() > PAYLOAD_BUFFER_KEEP_BYTES {
            return;
        }
        let mut kept = self.payload_buffers.lock().unwrap();
        if kept.len() < PAYLOAD_BUFFERS_KEPT_MAX {
            kept.push(p.buf);
        }
    }
    fn reply(&self, bytes: &[u8]) {
        let s = self.out.lock().unwrap();
        if let Err(e) = { &*s }.write_all(bytes) {
            log::debug!("{}: reply not sent: {e}", self.export.label());
        }
    }
    fn reply_error(&self, r: &Request, err: u32) {
        log::debug!(
            "{}: {} offset {} length {}: {}",
            self.export.label(),
            name_of_cmd(r.kind),
            r.offset,
            r.length,
            name_of_error(err)
        );
        self.reply(&simple_reply_header(err, r.cookie));
    }
}

/// Serves requests until the client disconnects, sends NBD_CMD_DISC, or breaks framing.
/// Returns after every in-flight request has been replied to.
pub fn serve(input: &Stream, output: Stream, export: Box<dyn Export>) -> io::Result<()> {
    let conn = Arc::new(Conn {
        export,
        out: Mutex::new(output),
        in_flight: InFlight::new(),
        payload_buffers: Mutex::new(Vec::new()),
    });
    let r = read_loop(input, &conn);
    conn.in_flight.wait_idle();
    r
}

fn read_loop(input: &Stream, conn: &Arc<Conn>) -> io::Result<()> {
    let size = conn.export.info().size;
    loop {
        let mut h = [0u8; REQUEST_SIZE];
        match { input }.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let Some(r) = parse_request(&h) else {
            log::warn!(
                "{}: bad request magic; closing the connection",
                conn.export.label()
            );
            return Ok(());
        };
        if let Err(err) = validate(&r, size) {
            if r.kind == NBD_CMD_WRITE {
                io::copy(&mut { input }.take(r.length as u64), &mut io::sink())?;
            }
            conn.reply_error(&r, err);
            continue;
        }
        if r.kind == NBD_CMD_DISC {
            return Ok(());
        }
        if let Some(cmd) = txn_command(r.kind) {
            // A barrier: everything sent before it has been executed, nothing after it starts
            // until it is done, so a transaction contains exactly the writes between its
            // BEGIN and COMMIT in stream order.
            conn.in_flight.wait_idle();
            execute_txn(conn, &r, cmd);
            continue;
        }
        let bytes = if matches!(r.kind, NBD_CMD_READ | NBD_CMD_WRITE) {
            r.length as u64
        } else {
            0
        };
        conn.in_flight.acquire(bytes);
        let payload = if r.kind == NBD_CMD_WRITE {
            let mut p = conn.payload_buffer(r.length as usize);
            let len = p.len;
            if let Err(e) = { input }.read_exact(&mut p.buf[..len]) {
                conn.in_flight.release(bytes);
                return Err(e);
            }
            Some(p)
        } else {
            None
        };
        let c = conn.clone();
        conn.export.spawn(Box::new(move || {
            execute(&c, &r, payload.as_ref().map_or(&[], Payload::bytes));
            if let Some(p) = payload {
                c.recycle(p);
            }
            c.in_flight.release(bytes);
        }));
    }
}

fn txn_command(kind: u16) -> Option<TxnCommand> {
    match kind {
        NBD_CMD_MVPS_BEGIN_TXN => Some(TxnCommand::Begin),
        NBD_CMD_MVPS_COMMIT_TXN => Some(TxnCommand::Commit),
        NBD_CMD_MVPS_ROLLBACK_TXN => Some(TxnCommand::Rollback),
        NBD_CMD_MVPS_LOCK_TXN => Some(TxnCommand::Lock),
        _ => None,
    }
}

fn execute_txn(conn: &Conn, r: &Request, cmd: TxnCommand) {
    let e = &conn.export;
    let mut result = e.transaction(cmd);
    if result.is_ok() && cmd == TxnCommand::Commit && r.flags & NBD_CMD_FLAG_FUA != 0 {
        result = e.flush();
    }
    match result {
        Ok(()) => conn.reply(&simple_reply_header(0, r.cookie)),
        Err(err) => {
            log::info!("{}: {}: {err}", e.label(), name_of_cmd(r.kind));
            conn.reply_error(r, errno_for(&err));
        }
    }
}

/// Largest read buffer a worker thread keeps between requests (bigger ones are freed).
const READ_BUFFER_KEEP_BYTES: usize = 4 << 20;

thread_local! {
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn execute(conn: &Conn, r: &Request, payload: &[u8]) {
    let e = &conn.export;
    let fua = r.flags & NBD_CMD_FLAG_FUA != 0;
    let result = match r.kind {
        NBD_CMD_READ => {
            let result = READ_BUFFER.with_borrow_mut(|buf| {
                // Reused per worker thread: a fresh 1 MiB buffer would cost a page fault per
                // 4 KiB. Every byte is overwritten by the read (zero pieces are filled).
                let len = SIMPLE_REPLY_SIZE + r.length as usize;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                let buf = &mut buf[..len];
                e.read(r.offset, &mut buf[SIMPLE_REPLY_SIZE..])?;
                buf[..SIMPLE_REPLY_SIZE].copy_from_slice(&simple_reply_header(0, r.cookie));
                conn.reply(buf);
                Ok(())
            });
            READ_BUFFER.with_borrow_mut(|buf| {
                if buf.capacity() > READ_BUFFER_KEEP_BYTES {
                    *buf = Vec::new();
                }
            });
            match result {
                Ok(()) => return,
                Err(err) => Err(err),
            }
        }
        NBD_CMD_WRITE => e.write(r.offset, payload, fua),
        NBD_CMD_FLUSH => e.flush(),
        NBD_CMD_TRIM => e.trim(r.offset, r.length as u64, fua),
        NBD_CMD_WRITE_ZEROES => e.write_zeroes(
            r.offset,
            r.length as u64,
            r.flags & NBD_CMD_FLAG_NO_HOLE != 0,
            fua,
        ),
        _ => unreachable!("validate() admits only the commands above"),
    };
    match result {
        Ok(()) => conn.reply(&simple_reply_header(0, r.cookie)),
        Err(err) => {
            log::warn!("{}: {} failed: {err}", e.label(), name_of_cmd(r.kind));
            conn.reply_error(r, errno_for(&err));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 1,
            offset,
            length,
        }
    }

    #[test]
    fn validation() {
        let size = 1 << 20;
        assert_eq!(validate(&req(NBD_CMD_READ, 0, 0, 4096), size), Ok(()));
        assert_eq!(
            validate(&req(NBD_CMD_READ, 0, size - 1, 2), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&req(NBD_CMD_READ, 0, u64::MAX, 2), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&req(NBD_CMD_WRITE, 0, size, 1), size),
            Err(NBD_ENOSPC)
        );
        assert_eq!(
            validate(&req(NBD_CMD_WRITE, 0, 0, (1 << 25) + 1), size),
            Err(NBD_EOVERFLOW)
        );
        assert_eq!(
            validate(&req(NBD_CMD_WRITE_ZEROES, 0, 0, u32::MAX), size),
            Err(NBD_ENOSPC)
        );
        assert_eq!(
            validate(&req(NBD_CMD_TRIM, 0, 0, u32::MAX), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(validate(&req(99, 0, 0, 0), size), Err(NBD_EINVAL));
        assert_eq!(
            validate(&req(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 1), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 1), size),
            Ok(())
        );
        assert_eq!(
            validate(&req(NBD_CMD_MVPS_BEGIN_TXN, 0, 0, 0), size),
            Ok(())
        );
        assert_eq!(
            validate(&req(NBD_CMD_MVPS_COMMIT_TXN, NBD_CMD_FLAG_FUA, 0, 0), size),
            Ok(())
        );
        assert_eq!(
            validate(&req(NBD_CMD_MVPS_LOCK_TXN, NBD_CMD_FLAG_FUA, 0, 0), size),
            Err(NBD_EINVAL)
        );
        assert_eq!(validate(&req(68, 0, 0, 0), size), Err(NBD_EINVAL));
    }

    #[test]
    fn request_parse() {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!((r.kind, r.length), (NBD_CMD_WRITE, 512));
        b[0] = 0;
        assert!(parse_request(&b).is_none());
    }
}
