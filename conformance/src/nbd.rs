//! A minimal raw NBD client (fixed newstyle, simple replies only), written from the spec so
//! that tests can send exactly the bytes they mean, including wrong ones.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_MVPS_BEGIN_TXN: u16 = 64;
pub const CMD_MVPS_COMMIT_TXN: u16 = 65;
pub const CMD_MVPS_ROLLBACK_TXN: u16 = 66;
pub const CMD_MVPS_LOCK_TXN: u16 = 67;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

/// A TCP or unix-domain connection.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
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
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// One option reply.
#[derive(Debug, Clone)]
pub struct OptReply {
    pub opt: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

/// What `NBD_OPT_GO` / `NBD_OPT_INFO` told us.
#[derive(Debug, Clone, Default)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum), when the server sent `NBD_INFO_BLOCK_SIZE`.
    pub block_size: Option<(u32, u32, u32)>,
}

/// A refused option (`typ` is an `NBD_REP_ERR_*`) or a broken connection.
#[derive(Debug)]
pub enum OptError {
    Refused(OptReply),
    Io(io::Error),
}

impl From<io::Error> for OptError {
    fn from(e: io::Error) -> Self {
        OptError::Io(e)
    }
}

/// A reply to a transmission request: the data of a successful read, or the NBD error number.
pub type Reply = Result<Vec<u8>, u32>;

/// A raw NBD client connection.
pub struct Client {
    pub s: Stream,
    /// Read lengths of requests sent and not yet answered, by handle.
    pending_reads: HashMap<u64, u32>,
    next_handle: u64,
    /// Whether the server offered `NBD_FLAG_NO_ZEROES` (and we took it).
    pub no_zeroes: bool,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    /// Wraps a fresh connection; reads nothing yet. Reads time out after 30 s.
    pub fn new(s: Stream) -> Client {
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("set_read_timeout");
        Client {
            s,
            pending_reads: HashMap::new(),
            next_handle: 1,
            no_zeroes: false,
        }
    }

    /// Reads the server greeting and answers it (fixed newstyle, no zeroes when offered).
    pub fn handshake(s: Stream) -> io::Result<Client> {
        let mut c = Client::new(s);
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g)?;
        if be64(&g) != NBDMAGIC || be64(&g[8..]) != IHAVEOPT {
            return Err(io::Error::other(format!(
                "not a newstyle greeting: {g:02x?}"
            )));
        }
        let sflags = be16(&g[16..]);
        if sflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(io::Error::other("server is not fixed newstyle"));
        }
        c.no_zeroes = sflags & FLAG_NO_ZEROES != 0;
        let cflags = u32::from(FLAG_FIXED_NEWSTYLE | (sflags & FLAG_NO_ZEROES));
        c.s.write_all(&cflags.to_be_bytes())?;
        Ok(c)
    }

    /// Sends an option request with `data`.
    pub fn send_option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m)
    }

    /// Reads one option reply, checking its magic.
    pub fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        if be64(&h) != OPT_REPLY_MAGIC {
            return Err(io::Error::other(format!(
                "bad option reply magic: {h:02x?}"
            )));
        }
        let len = be32(&h[16..]);
        if len > 1 << 20 {
            return Err(io::Error::other(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data)?;
        Ok(OptReply {
            opt: be32(&h[8..]),
            typ: be32(&h[12..]),
            data,
        })
    }

    /// `NBD_OPT_GO` (or `INFO` with `info_only`) for `name`, asking for `NBD_INFO_BLOCK_SIZE`.
    pub fn go_or_info(&mut self, name: &str, info_only: bool) -> Result<Export, OptError> {
        let opt = if info_only { OPT_INFO } else { OPT_GO };
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(opt, &d)?;
        let mut e = Export::default();
        let mut saw_export = false;
        loop {
            let r = self.read_option_reply()?;
            if r.opt != opt {
                return Err(
                    io::Error::other(format!("reply to option {} not {opt}", r.opt)).into(),
                );
            }
            match r.typ {
                REP_ACK if saw_export => return Ok(e),
                REP_ACK => return Err(io::Error::other("ACK without NBD_INFO_EXPORT").into()),
                REP_INFO if r.data.len() >= 2 => match be16(&r.data) {
                    INFO_EXPORT if r.data.len() == 12 => {
                        (e.size, e.flags, saw_export) =
                            (be64(&r.data[2..]), be16(&r.data[10..]), true)
                    }
                    INFO_BLOCK_SIZE if r.data.len() == 14 => {
                        let d = &r.data[2..];
                        e.block_size = Some((be32(d), be32(&d[4..]), be32(&d[8..])));
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(io::Error::other(format!("bad info length: {r:?}")).into())
                    }
                    _ => {}
                },
                t if t & (1 << 31) != 0 => return Err(OptError::Refused(r)),
                _ => return Err(io::Error::other(format!("unexpected reply {r:?}")).into()),
            }
        }
    }

    /// `NBD_OPT_GO`: on success the connection is in the transmission phase.
    pub fn go(&mut self, name: &str) -> Result<Export, OptError> {
        self.go_or_info(name, false)
    }

    /// `NBD_OPT_INFO`: the connection stays in the option phase.
    pub fn info(&mut self, name: &str) -> Result<Export, OptError> {
        self.go_or_info(name, true)
    }

    /// `NBD_OPT_EXPORT_NAME`: on success, (size, transmission flags).
    pub fn export_name(&mut self, name: &str) -> io::Result<(u64, u16)> {
        self.send_option(OPT_EXPORT_NAME, name.as_bytes())?;
        let mut b = [0u8; 10];
        self.s.read_exact(&mut b)?;
        if !self.no_zeroes {
            self.s.read_exact(&mut [0u8; 124])?;
        }
        Ok((be64(&b), be16(&b[8..])))
    }

    /// `NBD_OPT_LIST`: every reply up to and including the final ACK or error.
    pub fn list(&mut self) -> io::Result<Vec<OptReply>> {
        self.send_option(OPT_LIST, &[])?;
        let mut out = Vec::new();
        loop {
            let r = self.read_option_reply()?;
            let last = r.typ != REP_SERVER;
            out.push(r);
            if last {
                return Ok(out);
            }
        }
    }

    /// Sends one request header (and `payload`, sent as given whatever `len` says).
    pub fn send_request(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m)?;
        if cmd == CMD_READ {
            self.pending_reads.insert(handle, len);
        }
        Ok(handle)
    }

    /// Reads one simple reply: (handle, data of a successful read or the error number).
    pub fn read_reply(&mut self) -> io::Result<(u64, Reply)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if be32(&h) != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::other(format!("bad reply magic: {h:02x?}")));
        }
        let (error, handle) = (be32(&h[4..]), be64(&h[8..]));
        let read_len = self.pending_reads.remove(&handle);
        if error != 0 {
            return Ok((handle, Err(error)));
        }
        let mut data = vec![0u8; read_len.unwrap_or(0) as usize];
        self.s.read_exact(&mut data)?;
        Ok((handle, Ok(data)))
    }

    /// Sends one request and waits for its reply (no other request may be in flight).
    pub fn request(&mut self, flags: u16, cmd: u16, off: u64, len: u32, payload: &[u8]) -> Reply {
        let sent = self
            .send_request(flags, cmd, off, len, payload)
            .expect("sending request");
        let (handle, reply) = self.read_reply().expect("reading reply");
        assert_eq!(handle, sent, "reply for another request");
        reply
    }

    pub fn read(&mut self, off: u64, len: u32) -> Reply {
        self.request(0, CMD_READ, off, len, &[])
    }

    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<(), u32> {
        self.request(0, CMD_WRITE, off, data.len() as u32, data)
            .map(drop)
    }

    pub fn write_fua(&mut self, off: u64, data: &[u8]) -> Result<(), u32> {
        self.request(CMD_FLAG_FUA, CMD_WRITE, off, data.len() as u32, data)
            .map(drop)
    }

    pub fn flush(&mut self) -> Result<(), u32> {
        self.request(0, CMD_FLUSH, 0, 0, &[]).map(drop)
    }

    pub fn trim(&mut self, off: u64, len: u32) -> Result<(), u32> {
        self.request(0, CMD_TRIM, off, len, &[]).map(drop)
    }

    pub fn write_zeroes(&mut self, off: u64, len: u32, flags: u16) -> Result<(), u32> {
        self.request(flags, CMD_WRITE_ZEROES, off, len, &[])
            .map(drop)
    }

    /// A command without payload (transaction commands and unknown ones).
    pub fn command(&mut self, cmd: u16) -> Result<(), u32> {
        self.request(0, cmd, 0, 0, &[]).map(drop)
    }

    /// Sends `NBD_CMD_DISC` and waits for the server to close the connection.
    pub fn disconnect(mut self) {
        self.send_request(0, CMD_DISC, 0, 0, &[])
            .expect("sending DISC");
        assert!(
            self.closed_within(Duration::from_secs(10)),
            "server kept the connection after DISC"
        );
    }

    /// True if the server closes the connection (EOF or reset) within `t`; bytes the server
    /// still sends before closing are skipped.
    pub fn closed_within(&mut self, t: Duration) -> bool {
        let deadline = std::time::Instant::now() + t;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            self.s
                .set_read_timeout(Some(left))
                .expect("set_read_timeout");
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }
}
