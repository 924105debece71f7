//! An HTTP fault proxy: a small threaded TCP proxy on 127.0.0.1 in front of an S3 endpoint
//! (SeaweedFS) that, while faults are on, fails a share of the requests passing through it.
//!
//! Each client connection carries exactly one request: the proxy reads the request head and
//! its `Content-Length` body, decides (with a seeded RNG) what to do, and, when it forwards,
//! adds `Connection: close` so the upstream closes after its answer, which the proxy relays
//! until EOF. Clients (ureq) then open a new connection per request, so every request gets
//! its own decision. The faults, in equal shares of the fault rate:
//!
//! | fault | what the client sees | did the upstream apply it? |
//! |---|---|---|
//! | [`Fault::Unavailable503`] | `503 SlowDown` | no |
//! | [`Fault::Internal500`] | `500 InternalError` | **yes** (forwarded, answer replaced) |
//! | [`Fault::ResetBefore`] | connection reset, no answer | no |
//! | [`Fault::ResetAfter`] | connection reset, no answer | **yes** (answer dropped) |
//! | [`Fault::Stall`] | the right answer, a few seconds late | yes |
//! | [`Fault::CutBody`] | connection reset, no answer | **must not be**: the upstream got the head and only part of the body (often none of it), then the connection closed, as from a client killed mid-request |
//!
//! The "yes" rows are the ambiguous failures: a retried PUT or conditional create must cope
//! with its first attempt having succeeded. The cut body is the failure behind the client's
//! `Content-MD5` (docs/S3.md, *Request integrity*): without it SeaweedFS keeps a PUT cut
//! right after its head as an empty object, which would then fence the retry of a
//! conditional create. A request without a body cannot be cut; it is forwarded whole and its
//! answer dropped (as [`Fault::ResetAfter`]). Request signatures stay valid: the proxy does not
//! touch the `Host` header or the URL (presigned requests sign the host the client used, which
//! is the proxy's address, and the upstream checks them against that same header).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest request head the proxy reads (S3 request heads are well under 4 KiB).
const HEAD_BYTES_MAX: usize = 64 << 10;

/// Longest wait for the upstream to finish with a request whose body was cut short.
const CUT_ANSWER_WAIT: Duration = Duration::from_secs(10);

/// What the proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwarded untouched.
    None,
    /// Answered `503 SlowDown` without forwarding.
    Unavailable503,
    /// Forwarded, then answered `500 InternalError` instead of the upstream's answer.
    Internal500,
    /// Connection reset before forwarding.
    ResetBefore,
    /// Forwarded, then the connection is reset instead of relaying the answer.
    ResetAfter,
    /// Held for [`FaultProxy::stall`], then forwarded.
    Stall,
    /// The head and a prefix of the body forwarded (none of it half of the time, else a
    /// random part), then the upstream connection closed (FIN) and the client's reset.
    CutBody,
}

const FAULTS: [Fault; 6] = [
    Fault::Unavailable503,
    Fault::Internal500,
    Fault::ResetBefore,
    Fault::ResetAfter,
    Fault::Stall,
    Fault::CutBody,
];

/// Requests seen, by what was done to them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub unavailable_503: u64,
    pub internal_500: u64,
    pub reset_before: u64,
    pub reset_after: u64,
    pub stalled: u64,
    /// Requests with a body that the upstream got only part of.
    pub cut_body: u64,
}

impl Counts {
    /// Requests that failed (stalls are slow, not failed).
    pub fn failed(&self) -> u64 {
        self.unavailable_503
            + self.internal_500
            + self.reset_before
            + self.reset_after
            + self.cut_body
    }

    pub fn total(&self) -> u64 {
        self.passed + self.failed() + self.stalled
    }
}

struct Shared {
    upstream: SocketAddr,
    /// Faults per million requests while enabled.
    rate_ppm: AtomicU32,
    enabled: AtomicBool,
    stall_ms: AtomicU64,
    /// The faults to pick from (all of [`FAULTS`] unless narrowed).
    kinds: Mutex<Vec<Fault>>,
    rng: Mutex<u64>,
    counts: Mutex<Counts>,
    stop: AtomicBool,
}

impl Shared {
    fn random(&self) -> u64 {
        let mut s = self.rng.lock().unwrap();
        splitmix64(&mut s)
    }

    fn decide(&self) -> Fault {
        let x = self.random();
        if !self.enabled.load(Ordering::SeqCst) {
            return Fault::None;
        }
        let roll = (x >> 32) % 1_000_000;
        if roll >= u64::from(self.rate_ppm.load(Ordering::SeqCst)) {
            return Fault::None;
        }
        let kinds = self.kinds.lock().unwrap();
        kinds[(x % kinds.len() as u64) as usize]
    }

    fn count(&self, f: Fault) {
        let mut c = self.counts.lock().unwrap();
        match f {
            Fault::None => c.passed += 1,
            Fault::Unavailable503 => c.unavailable_503 += 1,
            Fault::Internal500 => c.internal_500 += 1,
            Fault::ResetBefore => c.reset_before += 1,
            Fault::ResetAfter => c.reset_after += 1,
            Fault::Stall => c.stalled += 1,
            Fault::CutBody => c.cut_body += 1,
        }
    }
}

fn splitmix64(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A running proxy; stopped on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (an `http://host:port` endpoint), faults off, failing
    /// `rate` (0.0..=1.0) of the requests once they are switched on. `seed` fixes the
    /// sequence of decisions.
    pub fn start(upstream: &str, rate: f64, seed: u64) -> FaultProxy {
        let hostport = upstream
            .strip_prefix("http://")
            .unwrap_or(upstream)
            .trim_end_matches('/');
        let upstream: SocketAddr = hostport
            .parse()
            .unwrap_or_else(|e| panic!("upstream {hostport:?} is not host:port: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fault proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            rate_ppm: AtomicU32::new((rate.clamp(0.0, 1.0) * 1e6) as u32),
            enabled: AtomicBool::new(false),
            stall_ms: AtomicU64::new(3000),
            kinds: Mutex::new(FAULTS.to_vec()),
            rng: Mutex::new(seed),
            counts: Mutex::new(Counts::default()),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("faultproxy-accept".into())
            .spawn(move || accept_loop(listener, sh))
            .expect("spawning the fault proxy");
        FaultProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:<port>`: the `S3_ENDPOINT` that goes through the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches faults on or off (requests in flight keep the decision already made).
    pub fn set_faults(&self, on: bool) {
        self.shared.enabled.store(on, Ordering::SeqCst);
    }

    /// How long a stalled request is held (default 3 s).
    pub fn set_stall(&self, d: Duration) {
        self.shared
            .stall_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Injects only these faults (in equal shares of the rate). Panics if `kinds` is empty
    /// or contains [`Fault::None`].
    pub fn set_kinds(&self, kinds: &[Fault]) {
        assert!(!kinds.is_empty() && !kinds.contains(&Fault::None));
        *self.shared.kinds.lock().unwrap() = kinds.to_vec();
    }

    pub fn stall(&self) -> Duration {
        Duration::from_millis(self.shared.stall_ms.load(Ordering::SeqCst))
    }

    pub fn counts(&self) -> Counts {
        *self.shared.counts.lock().unwrap()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name("faultproxy-conn".into())
            .spawn(move || {
                let _ = handle(conn, &sh);
            });
    }
}

/// A parsed request head: its bytes with `Connection: close` forced, and the body length.
struct Head {
    bytes: Vec<u8>,
    content_length: u64,
}

fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<Option<Head>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            return if lines.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        total += n;
        if total > HEAD_BYTES_MAX {
            return Err(io::Error::other("request head too large"));
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        lines.push(line);
    }
    let mut content_length = 0;
    let mut bytes = Vec::with_capacity(total + 32);
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            let name = name.trim().to_ascii_lowercase();
            if name == "connection" || name == "keep-alive" {
                continue;
            }
            if name == "content-length" {
                content_length = value.trim().parse().map_err(io::Error::other)?;
            }
            if name == "transfer-encoding" {
                return Err(io::Error::other("chunked request bodies are not supported"));
            }
        }
        bytes.extend_from_slice(line.as_bytes());
    }
    bytes.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Some(Head {
        bytes,
        content_length,
    }))
}

fn handle(client: TcpStream, sh: &Shared) -> io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let Some(head) = read_head(&mut reader)? else {
        return Ok(());
    };
    let mut body = Vec::new();
    (&mut reader)
        .take(head.content_length)
        .read_to_end(&mut body)?;
    if body.len() as u64 != head.content_length {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut fault = sh.decide();
    if fault == Fault::CutBody && body.is_empty() {
        fault = Fault::ResetAfter;
    }
    sh.count(fault);
    let mut client = client;
    match fault {
        Fault::CutBody => {
            let x = sh.random();
            let cut = if x & 1 == 0 {
                0
            } else {
                ((x >> 1) % body.len() as u64) as usize
            };
            let mut up = TcpStream::connect(sh.upstream)?;
            up.write_all(&head.bytes)?;
            up.write_all(&body[..cut])?;
            let _ = up.shutdown(Shutdown::Write);
            // Whatever the upstream makes of it (an error answer, or just a close).
            up.set_read_timeout(Some(CUT_ANSWER_WAIT))?;
            let mut answer = Vec::new();
            let _ = up.read_to_end(&mut answer);
            reset(client);
        }
        Fault::Unavailable503 => {
            respond(&mut client, 503, "Service Unavailable", "SlowDown")?;
        }
        Fault::ResetBefore => reset(client),
        Fault::Internal500 => {
            let _ = forward_collect(sh, &head, &body)?;
            respond(&mut client, 500, "Internal Server Error", "InternalError")?;
        }
        Fault::ResetAfter => {
            let _ = forward_collect(sh, &head, &body)?;
            reset(client);
        }
        Fault::Stall | Fault::None => {
            if fault == Fault::Stall {
                std::thread::sleep(Duration::from_millis(sh.stall_ms.load(Ordering::SeqCst)));
            }
            let mut up = TcpStream::connect(sh.upstream)?;
            up.write_all(&head.bytes)?;
            up.write_all(&body)?;
            io::copy(&mut up, &mut client)?;
            let _ = client.shutdown(Shutdown::Write);
        }
    }
    Ok(())
}

/// Sends the request upstream and reads its whole answer (which is then thrown away).
fn forward_collect(sh: &Shared, head: &Head, body: &[u8]) -> io::Result<Vec<u8>> {
    let mut up = TcpStream::connect(sh.upstream)?;
    up.write_all(&head.bytes)?;
    up.write_all(body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    Ok(answer)
}

fn respond(c: &mut TcpStream, status: u16, reason: &str, code: &str) -> io::Result<()> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>injected by the mvps fault proxy</Message>\
         <RequestId>faultproxy</RequestId></Error>"
    );
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body.as_bytes())?;
    let _ = c.shutdown(Shutdown::Write);
    Ok(())
}

/// Closes with SO_LINGER 0: the peer gets a TCP RST instead of an orderly FIN.
fn reset(c: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized `linger`.
    unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(c);
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK_HELLO: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

    /// A one-shot HTTP server answering every request with 200 and `hello`, counting them.
    fn upstream() -> (String, Arc<AtomicU64>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let n = n2.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(c.try_clone().unwrap());
                    if let Ok(Some(h)) = read_head(&mut r) {
                        let mut body = vec![0u8; h.content_length as usize];
                        r.read_exact(&mut body).unwrap();
                        n.fetch_add(1, Ordering::SeqCst);
                        let mut c = c;
                        let _ = c.write_all(OK_HELLO);
                    }
                });
            }
        });
        (format!("http://{addr}"), n)
    }

    fn get(endpoint: &str) -> io::Result<String> {
        let addr = endpoint.strip_prefix("http://").unwrap();
        let mut c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        c.write_all(
            b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc",
        )?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s)
    }

    #[test]
    fn faults_follow_the_switch_and_rate() {
        let (up, applied) = upstream();
        let p = FaultProxy::start(&up, 0.5, 7);
        p.set_stall(Duration::from_millis(10));
        for _ in 0..20 {
            assert!(get(&p.endpoint()).unwrap().ends_with("hello"));
        }
        assert_eq!(p.counts().passed, 20);
        p.set_faults(true);
        let mut ok = 0;
        for _ in 0..400 {
            match get(&p.endpoint()) {
                Ok(s) if s.ends_with("hello") => ok += 1,
                Ok(s) => assert!(s.starts_with("HTTP/1.1 50"), "{s}"),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
            }
        }
        let c = p.counts();
        assert_eq!(c.total(), 420);
        assert_eq!(20 + ok as u64, c.passed + c.stalled);
        // About half of 400 fail or stall; each kind happens.
        assert!((140..=260).contains(&(c.failed() + c.stalled)), "{c:?}");
        assert!(c.unavailable_503 > 0 && c.internal_500 > 0 && c.reset_before > 0);
        assert!(
            c.reset_after > 0 && c.stalled > 0 && c.cut_body > 0,
            "{c:?}"
        );
        // Forwarded requests reached the upstream whole, the others did not (a cut body
        // reaches it short, and the upstream here does not count it).
        let forwarded = c.passed + c.stalled + c.internal_500 + c.reset_after;
        assert_eq!(applied.load(Ordering::SeqCst), forwarded, "{c:?}");
        p.set_faults(false);
        assert!(get(&p.endpoint()).unwrap().ends_with("hello"));
    }
}
