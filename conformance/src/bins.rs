//! Locating the workspace binaries under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("conformance/ has a parent")
        .to_owned()
}

/// The profile directory the binaries live in, e.g. `target/debug`.
///
/// Integration tests run from `<target>/<profile>/deps/`, so the profile directory is two
/// levels up from the test executable; this follows `CARGO_TARGET_DIR` and `--release` without
/// having to re-implement cargo's rules. Falls back to `CARGO_TARGET_DIR` or `<root>/target`.
pub fn profile_dir() -> PathBuf {
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        let deps = exe.parent()?;
        (deps.file_name()? == "deps").then(|| deps.parent().map(Path::to_owned))?
    });
    from_exe.unwrap_or_else(|| {
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) => workspace_root().join(t),
            None => workspace_root().join("target"),
        };
        target.join("debug")
    })
}

/// The workspace binaries the suites run.
pub const BINARIES: &[&str] = &["mvps-te", "mvpsctl", "mvps-s3-gc"];

/// Path of a workspace binary (`mvps-te`, `mvpsctl`, `mvps-s3-gc`), built first if it is missing or older
/// than any source of the root package.
///
/// The check runs once per test process. Building only when stale (rather than always
/// calling cargo) matters: `cargo test` and `cargo build` unify dependency features
/// differently, so an unconditional nested `cargo build` would relink the server after every
/// `cargo test` build, and the other way round.
pub fn bin(name: &str) -> PathBuf {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        if BINARIES.iter().any(|b| is_stale(&profile_dir().join(b))) {
            build();
        }
    });
    let p = profile_dir().join(name);
    assert!(p.exists(), "{} does not exist after building", p.display());
    p
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Newest modification time of `p` and, for a directory, of everything below it.
fn newest(p: &Path) -> Option<SystemTime> {
    let own = mtime(p);
    let Ok(rd) = std::fs::read_dir(p) else {
        return own;
    };
    rd.filter_map(|e| newest(&e.ok()?.path())).chain(own).max()
}

fn is_stale(binary: &Path) -> bool {
    let Some(built) = mtime(binary) else {
        return true;
    };
    let root = workspace_root();
    ["src", "gc/src", "gc/Cargo.toml", "Cargo.toml", "Cargo.lock"]
        .iter()
        .filter_map(|p| newest(&root.join(p)))
        .any(|t| t > built)
}

fn build() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "--workspace", "--bins"]);
    let profile = profile_dir();
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target) = profile.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd.status().expect("running cargo build");
    assert!(
        status.success(),
        "cargo build --workspace --bins failed: {status}"
    );
}
