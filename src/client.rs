//! A small blocking NBD client that speaks what mvps serves, including the transactional
//! extension (docs/PROTOCOL.md): used by `mvpsctl txn` and by the conformance suites.
//!
//! - Fixed newstyle handshake with `NBD_OPT_GO` (asking for `NBD_INFO_BLOCK_SIZE`); a server
//!   that answers `NBD_REP_ERR_UNSUP` gets `NBD_OPT_EXPORT_NAME` instead, as the spec allows.
//!   Any other refusal is an [`Error::Handshake`] carrying the server's message.
//! - One request at a time, simple replies only (structured replies are never negotiated).
//! - READ and WRITE longer than the server's maximum payload are split into several requests;
//!   so are TRIM and WRITE_ZEROES longer than [`EFFECT_BYTES_MAX`]. Outside a transaction
//!   each piece is its own change: only a transaction makes a split write atomic.
//! - Every socket operation has a timeout ([`TIMEOUT_DEFAULT`]), so no call blocks forever.
//! - After an I/O or framing error the connection is unusable (the stream may be out of
//!   step); every later call fails fast.

pub mod sha256;

use crate::nbd::consts::*;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Socket read/write timeout until [`Client::set_timeout`] changes it. Generous because a
/// LOCK or a plain write may wait for another connection's transaction (up to the server's
/// `--txn-lock-timeout-ms`, 30 s by default).
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// Maximum READ/WRITE payload when the server does not advertise one (the spec's default).
pub const PAYLOAD_BYTES_DEFAULT: u32 = 1 << 25;
/// Largest payload we use even if the server advertises more (bounds our buffers).
pub const PAYLOAD_BYTES_MAX: u32 = 1 << 30;
/// Largest effect length of one TRIM or WRITE_ZEROES request (they carry no payload).
pub const EFFECT_BYTES_MAX: u64 = 1 << 30;
/// Longest export name (token) we send: the spec's NBD_MAX_STRING.
pub const EXPORT_NAME_BYTES_MAX: usize = 4096;
/// Longest option reply payload we accept during the handshake.
pub const OPTION_REPLY_BYTES_MAX: u32 = 64 << 10;
/// Option replies to one `NBD_OPT_GO` we read before calling the server broken.
pub const OPTION_REPLIES_MAX: u32 = 32;
/// How long [`Client::disconnect`] waits for the server to close after `NBD_CMD_DISC`.
pub const DISCONNECT_WAIT: Duration = Duration::from_secs(5);

/// The oldstyle greeting's second magic ("cliserv magic"), which we do not speak.
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const REQUEST_BYTES: usize = 28;
const REPLY_BYTES: usize = 16;

/// What went wrong.
#[derive(Debug)]
pub enum Error {
    /// The socket failed (refused, reset, timed out, closed). The connection is unusable.
    Io(io::Error),
    /// The handshake failed; the message says why (the server's own words when it sent any).
    Handshake(String),
    /// The server answered a request with an error; the connection stays usable.
    Nbd { command: &'static str, errno: u32 },
    /// The server broke the protocol (bad magic, wrong cookie, ...). The connection is unusable.
    Protocol(String),
    /// The request does not fit the export; nothing was sent.
    OutOfRange { offset: u64, length: u64, size: u64 },
    /// The server did not advertise the transmission flag this request needs.
    Unsupported(&'static str),
}

impl Error {
    /// An `EPERM` reply: for LOCK, another commit happened since BEGIN; for COMMIT, the
    /// transaction lost the image lock to its timeout. Roll back (after a failed LOCK) and
    /// retry the whole transaction.
    pub fn is_conflict(&self) -> bool {
        self.errno() == Some(NBD_EPERM)
    }

    /// The NBD error value of an error reply.
    pub fn errno(&self) -> Option<u32> {
        match self {
            Error::Nbd { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "connection: {e}"),
            Error::Handshake(m) => write!(f, "handshake: {m}"),
            Error::Nbd { command, errno } => {
                write!(f, "{command} failed: {} ({errno})", name_of_error(*errno))
            }
            Error::Protocol(m) => write!(f, "protocol violation by the server: {m}"),
            Error::OutOfRange {
                offset,
                length,
                size,
            } => write!(
                f,
                "range {offset}+{length} lies outside the export ({size} bytes)"
            ),
            Error::Unsupported(what) => write!(f, "the server does not support {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `NBD_INFO_BLOCK_SIZE` as the server sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(addr: &str, timeout: Duration) -> io::Result<Stream> {
        if let Some(path) = addr.strip_prefix("unix:") {
            return UnixStream::connect(path).map(Stream::Unix);
        }
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(Stream::Tcp(s));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An open NBD connection in the transmission phase.
pub struct Client {
    stream: Stream,
    size: u64,
    transmission_flags: u16,
    block_sizes: Option<BlockSizes>,
    /// Largest READ/WRITE payload per request (from the block sizes, a multiple of minimum).
    payload_bytes_max: u32,
    next_cookie: u64,
    /// Set after an I/O or framing error: the stream may be out of step.
    broken: bool,
    /// Set once NBD_CMD_DISC was sent (or the socket shut down).
    closed: bool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token: it is a credential.
        f.debug_struct("Client")
            .field("size", &self.size)
            .field("transmission_flags", &self.transmission_flags)
            .field("block_sizes", &self.block_sizes)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `addr` (`HOST:PORT` or `unix:/path`) and opens the export named `token`.
    pub fn connect(addr: &str, token: &str) -> Result<Client> {
        let stream = Stream::connect(addr, TIMEOUT_DEFAULT)?;
        stream.set_timeout(Some(TIMEOUT_DEFAULT))?;
        Client::handshake(stream, token)
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server advertised (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// The server's block sizes, if it sent `NBD_INFO_BLOCK_SIZE`.
    pub fn block_sizes(&self) -> Option<BlockSizes> {
        self.block_sizes
    }

    /// Largest payload of one READ or WRITE request; longer ones are split.
    pub fn payload_bytes_max(&self) -> u32 {
        self.payload_bytes_max
    }

    /// Changes the socket timeout (`None`: wait forever — avoid).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<()> {
        Ok(self.stream.set_timeout(t)?)
    }

    fn handshake(mut stream: Stream, token: &str) -> Result<Client> {
        let greeting = read_array::<18>(&mut stream).map_err(handshake_io("greeting"))?;
        let flags = parse_greeting(&greeting)?;
        let no_zeroes = flags & NBD_FLAG_NO_ZEROES != 0;
        let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= NBD_FLAG_C_NO_ZEROES;
        }
        stream
            .write_all(&client_flags.to_be_bytes())
            .map_err(handshake_io("client flags"))?;
        if token.len() > EXPORT_NAME_BYTES_MAX {
            return Err(Error::Handshake(format!(
                "token of {} bytes is longer than {EXPORT_NAME_BYTES_MAX}",
                token.len()
            )));
        }
        let (size, transmission_flags, block_sizes) = match go(&mut stream, token)? {
            Go::Opened(e) => e,
            Go::Unsupported => export_name(&mut stream, token, no_zeroes)?,
        };
        let payload_bytes_max = payload_bytes_max(block_sizes);
        Ok(Client {
            stream,
            size,
            transmission_flags,
            block_sizes,
            payload_bytes_max,
            next_cookie: 1,
            broken: false,
            closed: false,
        })
    }

    // ------------------------------------------------------------------------ requests

    /// Sends one request and reads its simple reply; `read_into` receives a READ's data.
    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        read_into: Option<&mut [u8]>,
    ) -> Result<()> {
        if self.broken || self.closed {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection unusable after an earlier error or disconnect",
            )));
        }
        let r = self.exchange(cmd, flags, offset, length, payload, read_into);
        if matches!(r, Err(Error::Io(_)) | Err(Error::Protocol(_))) {
            self.broken = true;
        }
        r
    }

    fn exchange(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        read_into: Option<&mut [u8]>,
    ) -> Result<()> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let header = encode_request(flags, cmd, cookie, offset, length);
        if payload.len() <= 64 << 10 {
            // One write for small requests: a single segment on the wire.
            let mut m = Vec::with_capacity(REQUEST_BYTES + payload.len());
            m.extend_from_slice(&header);
            m.extend_from_slice(payload);
            self.stream.write_all(&m)?;
        } else {
            self.stream.write_all(&header)?;
            self.stream.write_all(payload)?;
        }
        let reply = read_array::<REPLY_BYTES>(&mut self.stream)?;
        let (errno, got) = parse_simple_reply(&reply)?;
        if got != cookie {
            return Err(Error::Protocol(format!(
                "reply cookie {got}, expected {cookie}"
            )));
        }
        if errno != 0 {
            return Err(Error::Nbd {
                command: name_of_cmd(cmd),
                errno,
            });
        }
        if let Some(buf) = read_into {
            self.stream.read_exact(buf)?;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                length,
                size: self.size,
            }),
        }
    }

    fn need(&self, flag: u16, what: &'static str) -> Result<()> {
        if self.transmission_flags & flag == 0 {
            return Err(Error::Unsupported(what));
        }
        Ok(())
    }

    /// Reads `length` bytes at `offset`.
    pub fn read(&mut self, offset: u64, length: usize) -> Result<Vec<u8>> {
        self.check_range(offset, length as u64)?;
        let mut buf = vec![0u8; length];
        let max = self.payload_bytes_max as u64;
        for (at, n) in split(offset, length as u64, max) {
            let from = (at - offset) as usize;
            let out = &mut buf[from..from + n as usize];
            self.request(NBD_CMD_READ, 0, at, n as u32, &[], Some(out))?;
        }
        Ok(buf)
    }

    fn write_flags(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let max = self.payload_bytes_max as u64;
        for (at, n) in split(offset, data.len() as u64, max) {
            let from = (at - offset) as usize;
            let piece = &data[from..from + n as usize];
            self.request(NBD_CMD_WRITE, flags, at, n as u32, piece, None)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_flags(offset, data, 0)
    }

    /// Writes `data` at `offset` with `NBD_CMD_FLAG_FUA`: durable when this returns.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.need(NBD_FLAG_SEND_FUA, "FUA (NBD_FLAG_SEND_FUA)")?;
        self.write_flags(offset, data, NBD_CMD_FLAG_FUA)
    }

    /// `NBD_CMD_FLUSH`: every write replied before it is durable.
    pub fn flush(&mut self) -> Result<()> {
        self.need(NBD_FLAG_SEND_FLUSH, "FLUSH (NBD_FLAG_SEND_FLUSH)")?;
        self.request(NBD_CMD_FLUSH, 0, 0, 0, &[], None)
    }

    fn effect(&mut self, cmd: u16, offset: u64, length: u64) -> Result<()> {
        self.check_range(offset, length)?;
        for (at, n) in split(offset, length, EFFECT_BYTES_MAX) {
            self.request(cmd, 0, at, n as u32, &[], None)?;
        }
        Ok(())
    }

    /// `NBD_CMD_TRIM`: on mvps, trimmed bytes read as zeros.
    pub fn trim(&mut self, offset: u64, length: u64) -> Result<()> {
        self.need(NBD_FLAG_SEND_TRIM, "TRIM (NBD_FLAG_SEND_TRIM)")?;
        self.effect(NBD_CMD_TRIM, offset, length)
    }

    /// `NBD_CMD_WRITE_ZEROES`.
    pub fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()> {
        self.need(
            NBD_FLAG_SEND_WRITE_ZEROES,
            "WRITE_ZEROES (NBD_FLAG_SEND_WRITE_ZEROES)",
        )?;
        self.effect(NBD_CMD_WRITE_ZEROES, offset, length)
    }

    fn txn(&mut self, cmd: u16, flags: u16) -> Result<()> {
        self.request(cmd, flags, 0, 0, &[], None)
    }

    /// `NBD_CMD_MVPS_BEGIN_TXN`: later reads and writes on this connection belong to the
    /// transaction. `EINVAL` if one is already open.
    pub fn begin(&mut self) -> Result<()> {
        self.txn(NBD_CMD_MVPS_BEGIN_TXN, 0)
    }

    /// `NBD_CMD_MVPS_COMMIT_TXN`: applies the transaction atomically. The transaction is
    /// over afterwards, whatever the outcome; [`Error::is_conflict`] means it lost the
    /// image lock to the server's lock timeout and nothing was applied.
    pub fn commit(&mut self) -> Result<()> {
        self.txn(NBD_CMD_MVPS_COMMIT_TXN, 0)
    }

    /// COMMIT with `NBD_CMD_FLAG_FUA`: also durable (fdatasync'ed) when this returns.
    pub fn commit_fua(&mut self) -> Result<()> {
        self.txn(NBD_CMD_MVPS_COMMIT_TXN, NBD_CMD_FLAG_FUA)
    }

    /// `NBD_CMD_MVPS_ROLLBACK_TXN`: discards the transaction.
    pub fn rollback(&mut self) -> Result<()> {
        self.txn(NBD_CMD_MVPS_ROLLBACK_TXN, 0)
    }

    /// `NBD_CMD_MVPS_LOCK_TXN`: takes the image write lock. [`Error::is_conflict`] means
    /// something committed since BEGIN: the transaction stays open, roll it back and retry.
    pub fn lock(&mut self) -> Result<()> {
        self.txn(NBD_CMD_MVPS_LOCK_TXN, 0)
    }

    /// Soft disconnect (`NBD_CMD_DISC`), then waits (bounded) for the server to close. An
    /// open transaction is rolled back by the server.
    pub fn disconnect(mut self) -> Result<()> {
        if self.broken || self.closed {
            return Ok(());
        }
        self.closed = true;
        let header = encode_request(0, NBD_CMD_DISC, self.next_cookie, 0, 0);
        self.stream.write_all(&header)?;
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + DISCONNECT_WAIT;
        let mut sink = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            self.stream.set_timeout(Some(left))?;
            match self.stream.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Ok(()),
            }
        }
    }

    /// Closes the socket without `NBD_CMD_DISC` (a hard disconnect, as a network fault
    /// would). The server rolls back an open transaction. For tests and for giving up on a
    /// server that stopped answering.
    pub fn hard_disconnect(mut self) {
        self.closed = true;
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Drop for Client {
    /// A client that goes away says so (`NBD_CMD_DISC`, best effort) rather than dropping
    /// the connection, as the spec asks.
    fn drop(&mut self) {
        if !self.broken && !self.closed {
            let _ = self.stream.set_timeout(Some(Duration::from_secs(1)));
            let header = encode_request(0, NBD_CMD_DISC, self.next_cookie, 0, 0);
            let _ = self.stream.write_all(&header);
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }
}

// ---------------------------------------------------------------------- pure framing

fn read_array<const N: usize>(s: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn handshake_io(step: &'static str) -> impl Fn(io::Error) -> Error {
    move |e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Handshake(format!(
            "the server closed the connection during the {step}"
        )),
        _ => Error::Io(e),
    }
}

/// The handshake flags of a fixed-newstyle greeting.
fn parse_greeting(g: &[u8; 18]) -> Result<u16> {
    if be64(g) != NBDMAGIC {
        return Err(Error::Handshake(
            "not an NBD server (no NBDMAGIC greeting)".into(),
        ));
    }
    match be64(&g[8..]) {
        IHAVEOPT => {}
        CLISERV_MAGIC => {
            return Err(Error::Handshake(
                "oldstyle NBD server: not supported".into(),
            ))
        }
        m => return Err(Error::Handshake(format!("unknown greeting magic {m:#x}"))),
    }
    let flags = be16(&g[16..]);
    if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Handshake(
            "server does not speak fixed newstyle".into(),
        ));
    }
    Ok(flags)
}

/// The 28-byte request header (all fields big-endian).
pub fn encode_request(flags: u16, cmd: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut h = [0u8; REQUEST_BYTES];
    h[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&length.to_be_bytes());
    h
}

/// (error, cookie) of a simple reply header.
fn parse_simple_reply(r: &[u8; REPLY_BYTES]) -> Result<(u32, u64)> {
    match be32(r) {
        NBD_SIMPLE_REPLY_MAGIC => Ok((be32(&r[4..]), be64(&r[8..]))),
        STRUCTURED_REPLY_MAGIC => Err(Error::Protocol(
            "structured reply, which we never negotiated".into(),
        )),
        m => Err(Error::Protocol(format!("bad reply magic {m:#010x}"))),
    }
}

/// `[offset, offset+length)` in pieces of at most `max` bytes.
fn split(offset: u64, length: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    assert!(max > 0, "split with a zero maximum");
    let pieces = length.div_ceil(max);
    (0..pieces).map(move |i| {
        let at = i * max;
        (offset + at, max.min(length - at))
    })
}

fn payload_bytes_max(b: Option<BlockSizes>) -> u32 {
    let Some(b) = b else {
        return PAYLOAD_BYTES_DEFAULT;
    };
    let max = b.maximum.clamp(1, PAYLOAD_BYTES_MAX);
    // A multiple of the minimum block size, so aligned requests stay aligned when split.
    let min = b.minimum.max(1);
    if max >= min {
        max - max % min
    } else {
        min
    }
}

fn name_of_reply(t: u32) -> String {
    match t {
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP".into(),
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY".into(),
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID".into(),
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN".into(),
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN".into(),
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG".into(),
        t if t & NBD_REP_FLAG_ERROR != 0 => format!("error reply {}", t & !NBD_REP_FLAG_ERROR),
        t => format!("reply {t}"),
    }
}

type Opened = (u64, u16, Option<BlockSizes>);

enum Go {
    Opened(Opened),
    /// The server does not know NBD_OPT_GO: fall back to NBD_OPT_EXPORT_NAME.
    Unsupported,
}

fn send_option(s: &mut Stream, opt: u32, data: &[u8]) -> Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).map_err(handshake_io("option request"))?;
    Ok(())
}

/// NBD_OPT_GO payload: name length, name, one information request (NBD_INFO_BLOCK_SIZE).
fn go_payload(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    d
}

fn go(s: &mut Stream, token: &str) -> Result<Go> {
    send_option(s, NBD_OPT_GO, &go_payload(token))?;
    let mut export: Option<(u64, u16)> = None;
    let mut block_sizes = None;
    for _ in 0..OPTION_REPLIES_MAX {
        let h = read_array::<20>(s).map_err(handshake_io("NBD_OPT_GO reply"))?;
        if be64(&h) != NBD_OPT_REPLY_MAGIC {
            return Err(Error::Protocol("bad option reply magic".into()));
        }
        let (opt, typ, len) = (be32(&h[8..]), be32(&h[12..]), be32(&h[16..]));
        if opt != NBD_OPT_GO {
            return Err(Error::Protocol(format!(
                "reply to option {opt}, not NBD_OPT_GO"
            )));
        }
        if len > OPTION_REPLY_BYTES_MAX {
            return Err(Error::Protocol(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)
            .map_err(handshake_io("NBD_OPT_GO reply"))?;
        match typ {
            NBD_REP_ACK => {
                let (size, flags) = export.ok_or_else(|| {
                    Error::Protocol("NBD_REP_ACK to NBD_OPT_GO without NBD_INFO_EXPORT".into())
                })?;
                return Ok(Go::Opened((size, flags, block_sizes)));
            }
            NBD_REP_INFO => match parse_info(&data)? {
                Info::Export(size, flags) => export = Some((size, flags)),
                Info::BlockSizes(b) => block_sizes = Some(b),
                Info::Other => {}
            },
            NBD_REP_ERR_UNSUP => return Ok(Go::Unsupported),
            t if t & NBD_REP_FLAG_ERROR != 0 => {
                let msg = String::from_utf8_lossy(&data);
                let msg = if msg.is_empty() {
                    "(no message)".into()
                } else {
                    msg
                };
                return Err(Error::Handshake(format!(
                    "the server refused the export ({}): {msg}",
                    name_of_reply(t)
                )));
            }
            t => {
                return Err(Error::Protocol(format!(
                    "unexpected {} to NBD_OPT_GO",
                    name_of_reply(t)
                )))
            }
        }
    }
    Err(Error::Protocol(format!(
        "more than {OPTION_REPLIES_MAX} replies to NBD_OPT_GO"
    )))
}

#[derive(Debug, PartialEq, Eq)]
enum Info {
    Export(u64, u16),
    BlockSizes(BlockSizes),
    Other,
}

fn parse_info(d: &[u8]) -> Result<Info> {
    if d.len() < 2 {
        return Err(Error::Protocol("NBD_REP_INFO shorter than its type".into()));
    }
    match be16(d) {
        NBD_INFO_EXPORT if d.len() == 12 => Ok(Info::Export(be64(&d[2..]), be16(&d[10..]))),
        NBD_INFO_BLOCK_SIZE if d.len() == 14 => Ok(Info::BlockSizes(BlockSizes {
            minimum: be32(&d[2..]),
            preferred: be32(&d[6..]),
            maximum: be32(&d[10..]),
        })),
        t @ (NBD_INFO_EXPORT | NBD_INFO_BLOCK_SIZE) => Err(Error::Protocol(format!(
            "NBD_REP_INFO type {t} of {} bytes",
            d.len()
        ))),
        _ => Ok(Info::Other),
    }
}

fn export_name(s: &mut Stream, token: &str, no_zeroes: bool) -> Result<Opened> {
    send_option(s, NBD_OPT_EXPORT_NAME, token.as_bytes())?;
    // This option has no error reply: a refusal is a closed connection.
    let refused = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Handshake(
            "the server closed the connection after NBD_OPT_EXPORT_NAME (the export was \
             refused; this option carries no reason)"
                .into(),
        ),
        _ => Error::Io(e),
    };
    let b = read_array::<10>(s).map_err(refused)?;
    if !no_zeroes {
        read_array::<124>(s).map_err(refused)?;
    }
    Ok((be64(&b), be16(&b[8..]), None))
}

#[cfg(test)]
mod tests;
