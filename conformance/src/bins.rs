//! Locating the workspace binaries under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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

/// Path of a workspace binary (`mvps-te`, `mvpsctl`), built first if needed.
///
/// The build runs once per test process: `cargo build --bins -p mvps-te` is a quick no-op
/// when the binaries are current, and otherwise keeps a `cargo test` after an edit of `src/`
/// from testing a stale server.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(build);
    let p = profile_dir().join(name);
    assert!(p.exists(), "{} does not exist after building", p.display());
    p
}

fn build() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "--bins", "-p", "mvps-te"]);
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
        "cargo build --bins -p mvps-te failed: {status}"
    );
}
