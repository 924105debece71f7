//! Running external programs with a timeout, and asserting on what they did.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a finished program did.
pub struct Output {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics (showing everything) unless the program exited 0.
    #[track_caller]
    pub fn ok(self) -> Output {
        assert!(self.status.success(), "{self}");
        self
    }

    /// Panics (showing everything) if the program exited 0.
    #[track_caller]
    pub fn fails(self) -> Output {
        assert!(
            !self.status.success(),
            "expected a failure, got success: {self}"
        );
        self
    }

    /// stdout and stderr together, for searching.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.status,
            tail(&self.stdout, 8000),
            tail(&self.stderr, 8000)
        )
    }
}

/// The last `max` bytes of `s` (on a char boundary).
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Waits for `child` at most `timeout`; kills it (SIGKILL) and returns `None` on timeout.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr. Panics if it runs
/// longer than `timeout` (after killing it) or cannot be started.
#[track_caller]
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_p, err_p) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_p).expect("stdout file"))
        .stderr(File::create(&err_p).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let status = wait_timeout(&mut child, timeout);
    let out = Output {
        what,
        status: status.unwrap_or_default(),
        stdout: read(&out_p),
        stderr: read(&err_p),
    };
    if status.is_none() {
        panic!("timed out after {timeout:?}: {out}");
    }
    out
}

/// A file's contents as (lossy) UTF-8; empty if it does not exist.
pub fn read(p: &Path) -> String {
    let mut v = Vec::new();
    if let Ok(mut f) = File::open(p) {
        let _ = f.read_to_end(&mut v);
    }
    String::from_utf8_lossy(&v).into_owned()
}

/// `Command::new(program)` with `args`.
pub fn cmd<I, S>(program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Runs `sh -c script` and asserts it exits 0; returns stdout.
#[track_caller]
pub fn sh(script: &str, timeout: Duration) -> String {
    run(Command::new("sh").args(["-c", script]), timeout)
        .ok()
        .stdout
}

/// Held while a heavy (data-moving) test runs: at most one holder per machine at a time,
/// across threads and test processes. Released on drop.
pub struct Heavy {
    file: File,
}

impl Drop for Heavy {
    fn drop(&mut self) {
        let _ = fs2::FileExt::unlock(&self.file);
    }
}

/// Waits for, then takes, the machine-wide heavy-test lock.
pub fn heavy() -> Heavy {
    let p: PathBuf = std::env::temp_dir().join("mvps-conformance-heavy.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .expect("lock file");
    fs2::FileExt::lock_exclusive(&file).expect("locking the heavy-test lock");
    Heavy { file }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deterministic pseudo-random bytes (xorshift64*) — distinct per `seed`, cheap to regenerate.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}
