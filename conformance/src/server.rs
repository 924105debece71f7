//! One real `mvps-te` process under test, with its own temp data dir.

use crate::bins;
use crate::nbd::{Client, Stream};
use crate::token::{self, SECRET};
use crate::tools::{self, wait_timeout};
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a server may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Starts tried on fresh ports before giving up.
const START_ATTEMPTS: u32 = 3;
/// How long a server may take to exit after SIGTERM / SIGINT.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

/// A free TCP port on 127.0.0.1 (free when asked; the kernel may hand it out again later).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind :0")
        .local_addr()
        .expect("local_addr")
        .port()
}

/// `mvps-te` with a clean environment: no inherited `MVPS_TE_*`, AWS or S3 variables, and
/// `MVPS_TE_JWT_SECRET` set to `secret` if given.
pub fn base_command(secret: Option<&str>) -> Command {
    let mut c = Command::new(bins::bin("mvps-te"));
    for (k, _) in std::env::vars() {
        if k.starts_with("MVPS_TE_") || k.starts_with("AWS_") || k == "S3_ENDPOINT" {
            c.env_remove(k);
        }
    }
    if let Some(s) = secret {
        c.env("MVPS_TE_JWT_SECRET", s);
    }
    c.env("RUST_BACKTRACE", "1");
    c
}

/// Options of a server to start.
pub struct Builder {
    unix: bool,
    args: Vec<String>,
    env: Vec<(String, String)>,
    secret: Option<String>,
}

impl Builder {
    /// Listen on a unix socket instead of TCP.
    pub fn unix(mut self) -> Self {
        self.unix = true;
        self
    }

    /// Extra command-line arguments (kept for restarts).
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }

    /// An extra environment variable (kept for restarts).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Starts the server and waits until it accepts connections.
    #[track_caller]
    pub fn start(self) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("mvps-conf-")
            .tempdir()
            .expect("tempdir");
        let listen = if self.unix {
            Listen::Unix(dir.path().join("nbd.sock"))
        } else {
            Listen::Tcp(free_port())
        };
        let mut s = Server {
            dir,
            listen,
            args: self.args,
            env: self.env,
            secret: self.secret,
            child: None,
            starts: 0,
        };
        // The free port may be taken before the server binds it: then try another.
        for _ in 1..START_ATTEMPTS {
            match s.try_spawn_and_wait() {
                Ok(()) => return s,
                Err(_) if !self.unix && s.log().contains("in use") => {
                    s.listen = Listen::Tcp(free_port())
                }
                Err(e) => panic!("{e}\n{}", s.log_tail()),
            }
        }
        s.spawn_and_wait();
        s
    }
}

/// A running (or stopped) `mvps-te` process. Killed with SIGKILL on drop; if the test is
/// failing, its log is printed then.
pub struct Server {
    dir: TempDir,
    pub listen: Listen,
    args: Vec<String>,
    env: Vec<(String, String)>,
    secret: Option<String>,
    child: Option<Child>,
    starts: u32,
}

impl Server {
    pub fn builder() -> Builder {
        Builder {
            unix: false,
            args: Vec::new(),
            env: Vec::new(),
            secret: Some(SECRET.into()),
        }
    }

    /// A server on a free TCP port with default flags.
    #[track_caller]
    pub fn start() -> Server {
        Self::builder().start()
    }

    /// The temp directory of this server (data dir, logs, socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `--data-dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The default buffer store, `<data-dir>/buffer-store`.
    pub fn buffer_store(&self) -> PathBuf {
        self.data_dir().join("buffer-store")
    }

    /// The default local image store, `<data-dir>/image-store`.
    pub fn image_store(&self) -> PathBuf {
        self.data_dir().join("image-store")
    }

    /// The TCP port (panics for a unix-socket server).
    pub fn port(&self) -> u16 {
        match &self.listen {
            Listen::Tcp(p) => *p,
            Listen::Unix(_) => panic!("server listens on a unix socket"),
        }
    }

    /// The NBD URI of the export named `token` (RFC 3986 safe: JWTs use only `[A-Za-z0-9._-]`).
    pub fn uri(&self, token: &str) -> String {
        match &self.listen {
            Listen::Tcp(p) => format!("nbd://127.0.0.1:{p}/{token}"),
            Listen::Unix(s) => format!("nbd+unix:///{token}?socket={}", s.display()),
        }
    }

    /// qemu `--blockdev`/`--image-opts` options for the export named `token`.
    pub fn qemu_opts(&self, token: &str) -> String {
        match &self.listen {
            Listen::Tcp(p) => {
                format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={p},export={token}")
            }
            Listen::Unix(s) => {
                format!(
                    "driver=nbd,server.type=unix,server.path={},export={token}",
                    s.display()
                )
            }
        }
    }

    /// A new connection to the server.
    pub fn connect(&self) -> std::io::Result<Stream> {
        match &self.listen {
            Listen::Tcp(p) => TcpStream::connect(("127.0.0.1", *p)).map(Stream::Tcp),
            Listen::Unix(s) => UnixStream::connect(s).map(Stream::Unix),
        }
    }

    /// A raw client past the greeting (option phase).
    #[track_caller]
    pub fn handshake(&self) -> Client {
        Client::handshake(self.connect().expect("connecting")).expect("NBD greeting")
    }

    /// A raw client in the transmission phase on `token`'s export (via `NBD_OPT_GO`).
    #[track_caller]
    pub fn open(&self, token: &str) -> Client {
        let mut c = self.handshake();
        if let Err(e) = c.go(token) {
            panic!("NBD_OPT_GO refused: {e:?}\n{}", self.log_tail());
        }
        c
    }

    /// Asserts the server still serves a fresh, valid connection: write, read back, flush.
    #[track_caller]
    pub fn assert_serves(&self) {
        let id = token::image_id("alive");
        let mut c = self.open(&token::token(&id, 1 << 20));
        let data = tools::pattern(7, 4096 + 17);
        assert_eq!(c.write(4000, &data), Ok(()));
        assert_eq!(c.read(4000, data.len() as u32), Ok(data));
        assert_eq!(c.flush(), Ok(()));
        c.disconnect();
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("server-{n}.log"))
    }

    /// The current run's log (stdout and stderr).
    pub fn log(&self) -> String {
        tools::read(&self.log_path(self.starts))
    }

    /// Every run's log, in order.
    pub fn all_logs(&self) -> String {
        (1..=self.starts)
            .map(|n| tools::read(&self.log_path(n)))
            .collect()
    }

    /// The end of the current log, for failure messages.
    pub fn log_tail(&self) -> String {
        format!(
            "--- mvps-te log (run {}) ---\n{}",
            self.starts,
            tools::tail(&self.log(), 6000)
        )
    }

    /// The process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// The extra arguments this server starts with; changes apply from the next restart.
    pub fn args_mut(&mut self) -> &mut Vec<String> {
        &mut self.args
    }

    /// The command that starts this server (without spawning it).
    pub fn command(&self) -> Command {
        let mut c = base_command(self.secret.as_deref());
        let listen = match &self.listen {
            Listen::Tcp(p) => format!("127.0.0.1:{p}"),
            Listen::Unix(s) => format!("unix:{}", s.display()),
        };
        c.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(self.data_dir());
        c.args(&self.args);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    #[track_caller]
    fn spawn_and_wait(&mut self) {
        if let Err(e) = self.try_spawn_and_wait() {
            panic!("{e}\n{}", self.log_tail());
        }
    }

    /// Starts the process and waits until it accepts connections; `Err` if it exited first.
    fn try_spawn_and_wait(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "server already running");
        self.starts += 1;
        let log = File::create(self.log_path(self.starts)).expect("log file");
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawning mvps-te"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.connect().is_ok() {
                // A port taken by someone else also accepts: make sure ours did not exit.
                std::thread::sleep(Duration::from_millis(30));
            }
            if let Some(st) = self.exited() {
                return Err(format!("mvps-te exited during start-up with {st}"));
            }
            if self.connect().is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("mvps-te not listening after {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data dir and address.
    #[track_caller]
    pub fn restart(&mut self) {
        self.spawn_and_wait();
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` to the running server without waiting.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid();
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        let r = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(r, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits for the process to exit; panics if it still runs after [`STOP_TIMEOUT`].
    #[track_caller]
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("server is running");
        match wait_timeout(&mut c, STOP_TIMEOUT) {
            Some(st) => st,
            None => panic!(
                "mvps-te still running after {STOP_TIMEOUT:?}\n{}",
                self.log_tail()
            ),
        }
    }

    /// Sends `signal` and waits for the exit; panics if the process is still running after
    /// [`STOP_TIMEOUT`].
    #[track_caller]
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        self.signal(signal);
        self.wait_exit()
    }

    /// SIGTERM, then wait for the exit.
    #[track_caller]
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// Panics (with the exit status and the log) unless the process is still running.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(st) = self.exited() {
            panic!("mvps-te exited with {st}\n{}", self.log_tail());
        }
        assert!(self.child.is_some(), "mvps-te is not running");
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(st)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}
