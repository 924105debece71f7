//! The only code that talks HTTP (ureq). It sends signed [`Request`]s, reads bounded
//! responses, and retries per [`super::retry`]. It knows nothing about what the requests
//! mean: each caller passes an `accept` function that turns a response into its result (or
//! into an [`Error`], which may itself be retryable, like an `<Error>` inside a 200).

use super::error::Error;
use super::request::{self, Request};
use super::retry;
use rusty_s3::{Bucket, Credentials, Method};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use ureq::unversioned::transport::{ConnectionDetails, Connector, DefaultConnector, Transport};

/// Longest wait for a TCP (and TLS) connection, DNS included. A healthy endpoint answers in
/// milliseconds; past this the attempt counts as a connection error and is retried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest silence while reading a response (headers or body): a stalled connection is
/// abandoned after this and the request retried. Long enough for S3 to assemble a large
/// multipart object on CompleteMultipartUpload, which it answers only when done.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest stall while sending a request body (the peer's TCP window stays shut).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle keep-alive connections kept per endpoint: enough for the multipart upload threads
/// plus concurrent readers without reconnecting, few enough not to hoard sockets.
pub const IDLE_CONNECTIONS_MAX: usize = 32;

/// How long an idle connection stays in the pool. ureq's default (15 s) closed the whole
/// pool whenever a reader served from the caches paused longer than that, and the next
/// burst of misses reconnected every connection. A connection the server closed meanwhile
/// is noticed when taken from the pool (ureq probes it) and replaced, so longer is safe.
pub const IDLE_CONNECTION_AGE_MAX: Duration = Duration::from_secs(300);

/// Bytes of an error response we read; S3 error documents are well under 1 KiB, and a
/// proxy's HTML page is not worth more.
pub const ERROR_BODY_BYTES_MAX: u64 = 64 << 10;

/// Sent as `User-Agent`, so the store's logs say who we are.
pub const USER_AGENT: &str = concat!("mvps/", env!("CARGO_PKG_VERSION"));

/// A response, read in full (bounded by the caller's limit).
#[derive(Debug, Clone, Default)]
pub struct Response {
    pub status: u16,
    pub etag: Option<String>,
    pub content_length: Option<u64>,
    pub content_range: Option<String>,
    pub body: Vec<u8>,
    /// The success body read into the caller's buffers, back to back ([`Client::call_into`]);
    /// `body` is then empty.
    pub parts: Vec<Vec<u8>>,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why a request finally failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The error of the last attempt.
    pub last: Error,
    /// Attempts made (≥ 1).
    pub attempts: u32,
    /// The last error was retryable but we ran out of attempts.
    pub exhausted: bool,
    /// Some attempt may have been carried out by the server although we saw it fail.
    pub maybe_applied: bool,
}

/// An S3 bucket endpoint with credentials and a connection pool. Cheap to share (`Arc`).
pub struct Client {
    agent: ureq::Agent,
    bucket: Bucket,
    credentials: Credentials,
    endpoint: String,
    /// HTTP requests sent (every attempt counts), for tests and diagnostics.
    requests_sent: AtomicU64,
    /// New connections opened (a request on a pooled connection opens none).
    connections_opened: Arc<AtomicU64>,
}

/// Counts the connections the default connector chain opens: ureq calls the chain only when
/// its pool has no idle connection to the host, so this is the number of TCP (and TLS)
/// handshakes. A request whose response body was not read to its end gives its connection
/// up, and the next request opens a new one; the benchmark reports this per 1000 requests.
#[derive(Debug)]
struct CountingConnector(Arc<AtomicU64>);

impl Connector<Box<dyn Transport>> for CountingConnector {
    type Out = Box<dyn Transport>;

    fn connect(
        &self,
        _: &ConnectionDetails,
        chained: Option<Box<dyn Transport>>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if chained.is_some() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        Ok(chained)
    }
}

impl Client {
    pub fn new(bucket: Bucket, credentials: Credentials, endpoint: String) -> Client {
        let config = ureq::Agent::config_builder()
            // Statuses are answers we classify ourselves (412 is an outcome, not a failure).
            .http_status_as_error(false)
            // S3 redirects mean "wrong region"; following them would hide that.
            .max_redirects(0)
            .timeout_resolve(Some(CONNECT_TIMEOUT))
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .timeout_per_write(Some(WRITE_TIMEOUT))
            .max_idle_connections(IDLE_CONNECTIONS_MAX)
            .max_idle_connections_per_host(IDLE_CONNECTIONS_MAX)
            .max_idle_age(IDLE_CONNECTION_AGE_MAX)
            .user_agent(USER_AGENT)
            // Ranged reads must come back byte-exact, never re-encoded.
            .accept_encoding("identity")
            .build();
        let connections_opened = Arc::new(AtomicU64::new(0));
        let connector =
            DefaultConnector::new().chain(CountingConnector(connections_opened.clone()));
        let resolver = ureq::unversioned::resolver::DefaultResolver::default();
        Client {
            agent: ureq::Agent::with_parts(config, connector, resolver),
            bucket,
            credentials,
            endpoint,
            requests_sent: AtomicU64::new(0),
            connections_opened,
        }
    }

    /// HTTP requests sent so far (each attempt of each call).
    pub fn requests_sent(&self) -> u64 {
        self.requests_sent.load(Ordering::Relaxed)
    }

    /// Connections opened so far; near zero per request once the pool is warm.
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::Relaxed)
    }

    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends a request until `accept` takes a response, a non-retryable error occurs, or
    /// [`retry::REQUEST_ATTEMPTS_MAX`] attempts have failed. `sign` builds the request
    /// afresh for each attempt (new signature time); `body_limit` bounds a success body.
    pub fn call<T>(
        &self,
        what: &str,
        sign: impl Fn(&Bucket, &Credentials) -> Request,
        body: &[u8],
        body_limit: u64,
        accept: impl FnMut(Response) -> Result<T, Error>,
    ) -> Result<T, Failure> {
        self.call_tracked(what, sign, body, body_limit, accept)
            .map(|(v, _)| v)
    }

    /// [`Client::call`], also telling whether an earlier failed attempt may have been
    /// carried out by the server (so a later "already exists" may be our own doing).
    pub fn call_tracked<T>(
        &self,
        what: &str,
        sign: impl Fn(&Bucket, &Credentials) -> Request,
        body: &[u8],
        body_limit: u64,
        accept: impl FnMut(Response) -> Result<T, Error>,
    ) -> Result<(T, bool), Failure> {
        self.call_inner(what, sign, body, body_limit, None, accept)
    }

    /// [`Client::call`] for a request whose success body has exactly as many bytes as
    /// `parts` together (a ranged GET): the body is read into them in turn (recycled
    /// buffers: no allocation, no zeroing, no page faults) and handed to `accept` as
    /// `Response::parts`.
    pub fn call_into<T>(
        &self,
        what: &str,
        sign: impl Fn(&Bucket, &Credentials) -> Request,
        parts: Vec<Vec<u8>>,
        accept: impl FnMut(Response) -> Result<T, Error>,
    ) -> Result<T, Failure> {
        let limit = parts.iter().map(|p| p.len() as u64).sum();
        self.call_inner(what, sign, &[], limit, Some(parts), accept)
            .map(|(v, _)| v)
    }

    fn call_inner<T>(
        &self,
        what: &str,
        sign: impl Fn(&Bucket, &Credentials) -> Request,
        body: &[u8],
        body_limit: u64,
        mut into: Option<Vec<Vec<u8>>>,
        mut accept: impl FnMut(Response) -> Result<T, Error>,
    ) -> Result<(T, bool), Failure> {
        let mut maybe_applied = false;
        for attempt in 1..=retry::REQUEST_ATTEMPTS_MAX {
            let request = sign(&self.bucket, &self.credentials);
            check_integrity_header(what, &request, body);
            let err = match self.send_once(&request, body, body_limit, &mut into) {
                Ok(response) => match accept(response) {
                    Ok(v) => return Ok((v, maybe_applied)),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            maybe_applied |= retry::may_have_been_applied(&err);
            let retryable = retry::is_retryable(&err);
            if !retryable || attempt == retry::REQUEST_ATTEMPTS_MAX {
                let exhausted = retryable;
                return Err(Failure {
                    last: err,
                    attempts: attempt,
                    exhausted,
                    maybe_applied,
                });
            }
            let wait = retry::jittered_backoff(attempt);
            log::warn!(
                "s3 {what}: attempt {attempt}/{} failed: {err}; retrying in {} ms",
                retry::REQUEST_ATTEMPTS_MAX,
                wait.as_millis()
            );
            std::thread::sleep(wait);
        }
        unreachable!("the last attempt returns")
    }

    /// One attempt: send, then read the whole (bounded) body — into `into`'s buffers if
    /// they hold exactly the success body (they are then used up; a failed attempt leaves
    /// them for the next).
    fn send_once(
        &self,
        r: &Request,
        body: &[u8],
        body_limit: u64,
        into: &mut Option<Vec<Vec<u8>>>,
    ) -> Result<Response, Error> {
        let a = &self.agent;
        self.requests_sent.fetch_add(1, Ordering::Relaxed);
        let sent = match r.method {
            Method::Get => headers(a.get(&r.url), &r.headers).call(),
            Method::Head => headers(a.head(&r.url), &r.headers).call(),
            Method::Delete => headers(a.delete(&r.url), &r.headers).call(),
            Method::Put => headers(a.put(&r.url), &r.headers).send(body),
            Method::Post => headers(a.post(&r.url), &r.headers).send(body),
        };
        let response = sent.map_err(|e| transport_error(r.method, &self.endpoint, e))?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let mut out = Response {
            status: response.status().as_u16(),
            etag: header("etag"),
            content_length: header("content-length").and_then(|v| v.parse().ok()),
            content_range: header("content-range"),
            body: Vec::new(),
            parts: Vec::new(),
        };
        if r.method == Method::Head {
            return Ok(out);
        }
        let limit = if out.is_success() {
            body_limit
        } else {
            ERROR_BODY_BYTES_MAX
        };
        let reading = |e: std::io::Error| Error::Transport {
            retryable: true,
            message: format!("reading body: {e}"),
        };
        let exact = (into.as_ref()).map(|p| p.iter().map(|b| b.len() as u64).sum::<u64>());
        if out.is_success() && exact.is_some() && out.content_length == exact {
            // ureq stops at Content-Length and fails on a short body.
            let parts = into.as_mut().expect("checked above");
            let mut body = response.into_body().into_reader();
            for part in parts.iter_mut() {
                body.read_exact(part).map_err(reading)?;
            }
            // ureq hands the connection back to its pool only on the read that finds the
            // body's end; `read_exact` stops one read short of it, and dropping the reader
            // then closes the connection (a new TCP handshake per ranged GET).
            let mut past_end = [0u8; 1];
            if body.read(&mut past_end).map_err(reading)? != 0 {
                return Err(Error::Parse {
                    what: "oversized",
                    message: "response body longer than its Content-Length".into(),
                });
            }
            out.parts = into.take().expect("checked above");
            return Ok(out);
        }
        // Trust Content-Length only as a hint for the allocation, never past the limit.
        out.body
            .reserve(out.content_length.unwrap_or(0).min(limit) as usize);
        let mut reader = response
            .into_body()
            .into_reader()
            .take(limit.saturating_add(1));
        reader
            .read_to_end(&mut out.body)
            .map_err(|e| Error::Transport {
                retryable: true,
                message: format!("reading body: {e}"),
            })?;
        if out.body.len() as u64 > limit {
            if out.is_success() {
                let message = format!("response body larger than the {limit} bytes expected");
                return Err(Error::Parse {
                    what: "oversized",
                    message,
                });
            }
            out.body.truncate(limit as usize);
        }
        // A body without Content-Length that still fills the buffers exactly goes there too.
        let fits = out.is_success() && exact == Some(out.body.len() as u64);
        if let Some(mut parts) = into.take_if(|_| fits) {
            crate::store::cache::fill_parts(&mut parts, &out.body);
            out.body = Vec::new();
            out.parts = parts;
        }
        Ok(out)
    }
}

/// Every PUT, and every request with a body, must carry `Content-MD5`: without it a store
/// may keep a body cut short by a dropped connection as a shorter object (SeaweedFS stores
/// an empty one when the connection closes after the request head). A request built without
/// it is a bug, caught here (in debug builds: every test run) before anything is sent.
fn check_integrity_header(what: &str, r: &Request, body: &[u8]) {
    let needs = r.method == Method::Put || !body.is_empty();
    debug_assert!(
        !needs || r.headers.iter().any(|(h, _)| *h == request::CONTENT_MD5),
        "s3 {what}: {:?} request with a {}-byte body but no {} header",
        r.method,
        body.len(),
        request::CONTENT_MD5
    );
}

fn headers<B>(
    mut rb: ureq::RequestBuilder<B>,
    headers: &[(&'static str, String)],
) -> ureq::RequestBuilder<B> {
    for (name, value) in headers {
        rb = rb.header(*name, value.as_str());
    }
    rb
}

/// Classifies a failure to get any response. Timeouts, refused/reset connections, DNS and
/// protocol errors may pass; a bad URL or a TLS certificate problem will not.
fn transport_error(method: Method, endpoint: &str, e: ureq::Error) -> Error {
    let retryable = matches!(
        e,
        ureq::Error::Timeout(_)
            | ureq::Error::Io(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::Protocol(_)
    );
    Error::Transport {
        retryable,
        message: format!("{method} to {endpoint}: {e}"),
    }
}
