//! Bulk copies with libnbd's `nbdcopy`: a 256 MiB random file into the device and back out
//! must be byte-identical, with one connection and with four (the server advertises
//! `CAN_MULTI_CONN`, so nbdcopy spreads requests over connections that must agree). The
//! second test also kills the server with SIGKILL between copy-in and copy-out, so a large
//! write-ahead log is replayed. Guards lost, reordered or torn large writes.

use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, heavy, run};
use std::path::Path;
use std::time::{Duration, Instant};

const SIZE: u64 = 256 << 20;
const T: Duration = Duration::from_secs(600);

fn random_file(p: &Path) {
    let out = run(
        &mut cmd(
            "dd",
            [
                "if=/dev/urandom",
                &format!("of={}", p.display()),
                "bs=1M",
                "count=256",
            ],
        ),
        T,
    );
    out.ok();
    assert_eq!(std::fs::metadata(p).unwrap().len(), SIZE);
}

fn nbdcopy(conns: u32, from: &str, to: &str) {
    let started = Instant::now();
    run(
        &mut cmd(
            "nbdcopy",
            [&format!("--connections={conns}"), "--flush", from, to],
        ),
        T,
    )
    .ok();
    eprintln!("nbdcopy --connections={conns} took {:?}", started.elapsed());
}

fn assert_same_file(a: &Path, b: &Path) {
    run(&mut cmd("cmp", [a, b]), T).ok();
}

#[test]
fn copy_256_mib_in_and_out_on_one_connection() {
    let _h = heavy();
    let s = Server::start();
    let tok = token::token(&token::image_id("copy1"), SIZE);
    let (src, dst) = (s.dir().join("src.bin"), s.dir().join("dst.bin"));
    random_file(&src);
    nbdcopy(1, src.to_str().unwrap(), &s.uri(&tok));
    nbdcopy(1, &s.uri(&tok), dst.to_str().unwrap());
    assert_same_file(&src, &dst);
}

#[test]
fn copy_256_mib_with_four_connections_across_a_kill_9() {
    let _h = heavy();
    let mut s = Server::start();
    let tok = token::token(&token::image_id("copy4"), SIZE);
    let (src, dst) = (s.dir().join("src.bin"), s.dir().join("dst.bin"));
    random_file(&src);
    nbdcopy(4, src.to_str().unwrap(), &s.uri(&tok));
    s.kill9();
    s.restart();
    nbdcopy(4, &s.uri(&tok), dst.to_str().unwrap());
    assert_same_file(&src, &dst);
}

/// Write throttling slows writers down but never fails them (DESIGN §7): with a 1 MiB
/// throttle threshold, a 64 MiB copy still completes and reads back identical.
#[test]
fn throttled_writes_complete_and_read_back_identical() {
    let _h = heavy();
    let s = Server::builder()
        .args(["--write-throttle-threshold-pages", "256"])
        .args([
            "--checkpoint-interval-ms",
            "100",
            "--checkpoint-interval-jitter-ms",
            "0",
        ])
        .start();
    let tok = token::token(&token::image_id("throttle"), 64 << 20);
    let (src, dst) = (s.dir().join("src.bin"), s.dir().join("dst.bin"));
    std::fs::write(&src, mvps_conformance::tools::pattern(90, 64 << 20)).unwrap();
    nbdcopy(4, src.to_str().unwrap(), &s.uri(&tok));
    nbdcopy(1, &s.uri(&tok), dst.to_str().unwrap());
    assert_same_file(&src, &dst);
}
