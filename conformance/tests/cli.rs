//! The command line of `mvps-te` and `mvpsctl`: start-up failures exit non-zero with a
//! message instead of serving half-configured (no secret, port taken, buffer store locked by
//! another server, DESIGN §4); `--help` and `--version` work; flags can come from
//! `MVPS_TE_*` variables; `mvpsctl token` prints a token the server accepts.

use mvps_conformance::bins;
use mvps_conformance::nbd::{Client, Stream};
use mvps_conformance::server::{base_command, free_port, Server};
use mvps_conformance::token::{self, SECRET};
use mvps_conformance::tools::{run, wait_for, Output};
use std::net::TcpListener;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Runs `mvps-te` with `args` (plus a temp `--data-dir` unless given), expecting it to exit.
fn mvps_te(secret: Option<&str>, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut c = base_command(secret);
    c.args(args);
    if !args.contains(&"--data-dir") {
        c.arg("--data-dir").arg(dir.path().join("data"));
    }
    run(&mut c, T)
}

#[test]
fn missing_secret_exits_non_zero_with_one_line() {
    let port = free_port().to_string();
    let out = mvps_te(None, &["--listen", &format!("127.0.0.1:{port}")]).fails();
    let msg = out.stderr.trim();
    assert_eq!(msg.lines().count(), 1, "want one line: {out}");
    assert!(
        msg.contains("MVPS_TE_JWT_SECRET"),
        "message does not name the variable: {out}"
    );
    let out = mvps_te(Some(""), &["--listen", &format!("127.0.0.1:{port}")]).fails();
    assert!(
        out.stderr.contains("MVPS_TE_JWT_SECRET"),
        "an empty secret was accepted: {out}"
    );
}

#[test]
fn port_in_use_exits_non_zero() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = mvps_te(Some(SECRET), &["--listen", &addr]).fails();
    assert!(!out.stderr.trim().is_empty(), "no message: {out}");
}

#[test]
fn second_server_on_the_same_buffer_store_exits_non_zero() {
    let mut first = Server::start();
    let bs = first.buffer_store();
    first.assert_serves(); // the buffer store exists and is in use
    let port = free_port().to_string();
    let out = mvps_te(
        Some(SECRET),
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--buffer-store-path",
            bs.to_str().unwrap(),
        ],
    )
    .fails();
    assert!(!out.stderr.trim().is_empty(), "no message: {out}");
    first.assert_running();
    first.assert_serves();
}

#[test]
fn help_and_version_exit_zero() {
    let out = run(base_command(None).arg("--help"), T).ok();
    for flag in [
        "--listen",
        "--data-dir",
        "--checkpoint-interval-ms",
        "--image-store",
    ] {
        assert!(out.stdout.contains(flag), "--help lacks {flag}: {out}");
    }
    assert!(
        out.stdout.contains("MVPS_TE_"),
        "--help does not mention the environment: {out}"
    );
    let out = run(base_command(None).arg("--version"), T).ok();
    let line = out.stdout.trim();
    let has_version = line
        .split(|c: char| c.is_whitespace() || c == 'v')
        .any(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() == 3
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        });
    assert!(has_version, "--version printed no x.y.z version: {out}");
}

#[test]
fn unknown_flag_exits_non_zero() {
    mvps_te(Some(SECRET), &["--no-such-flag"]).fails();
}

#[test]
fn flags_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut c = base_command(Some(SECRET));
    c.env("MVPS_TE_LISTEN", format!("127.0.0.1:{port}"))
        .env("MVPS_TE_DATA_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    let stream = wait_for("mvps-te listening on MVPS_TE_LISTEN", T, || {
        assert!(child.try_wait().unwrap().is_none(), "mvps-te exited");
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    // It serves, and with its buffer store under MVPS_TE_DATA_DIR.
    let mut conn = Client::handshake(Stream::Tcp(stream)).unwrap();
    conn.go(&token::token(&token::image_id("env"), 1 << 20))
        .expect("GO");
    conn.write(0, b"env").unwrap();
    let used = dir.path().join("buffer-store").exists();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(used, "MVPS_TE_DATA_DIR was not used");
}

#[test]
fn mvpsctl_token_prints_a_token_the_server_accepts() {
    let id = token::image_id("ctl");
    let mut c = std::process::Command::new(bins::bin("mvpsctl"));
    c.env("MVPS_TE_JWT_SECRET", SECRET);
    c.args([
        "token",
        "--image-id",
        &id,
        "--size",
        "1G",
        "--client-id",
        "abc",
        "--ttl",
        "1h",
    ]);
    let out = run(&mut c, T).ok();
    let tok = out.stdout.trim();
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
    let claims = mvps::auth::verify(tok, SECRET.as_bytes()).expect("token verifies");
    assert_eq!(
        (claims.image_id.as_str(), claims.image_size),
        (id.as_str(), 1 << 30)
    );
    assert_eq!(
        (claims.page_size_bits, claims.client_id.as_deref()),
        (12, Some("abc"))
    );
    assert!(
        claims.exp.abs_diff(token::now() + 3600) < 60,
        "exp {}",
        claims.exp
    );

    let s = Server::start();
    let mut conn = s.handshake();
    assert_eq!(
        conn.go(tok).expect("server accepts the mvpsctl token").size,
        1 << 30
    );

    // Without the secret, or with a bad image id, mvpsctl fails with a message.
    let mut c = std::process::Command::new(bins::bin("mvpsctl"));
    c.env_remove("MVPS_TE_JWT_SECRET")
        .args(["token", "--image-id", &id, "--size", "1G"]);
    let out = run(&mut c, T).fails();
    assert!(out.stderr.contains("MVPS_TE_JWT_SECRET"), "{out}");
    let mut c = std::process::Command::new(bins::bin("mvpsctl"));
    c.env("MVPS_TE_JWT_SECRET", SECRET)
        .args(["token", "--image-id", "../x", "--size", "1G"]);
    assert!(run(&mut c, T).fails().stdout.trim().is_empty());
}
