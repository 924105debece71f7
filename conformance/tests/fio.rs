//! fio's NBD engine (libnbd, many requests in flight on one connection) writing random blocks
//! with crc32c verification headers, then reading every block back and checking it; then a
//! `--verify_only` pass on a new connection after the server restarted. An unaligned block
//! size (3000 bytes) makes concurrent writes share pages. Guards lost or misplaced writes
//! under concurrency, and races in partial-page read-modify-write.

use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, heavy, run, Output};
use std::time::Duration;

const T: Duration = Duration::from_secs(600);

fn fio(s: &Server, tok: &str, job: &[&str], extra: &[&str]) -> Output {
    let uri = format!("--uri={}", s.uri(tok));
    let mut c = cmd(
        "fio",
        ["--name=mvps", "--ioengine=nbd", &uri, "--rw=randwrite"],
    );
    c.args([
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--randseed=4242",
    ]);
    c.args(job).args(extra);
    // fio writes verify-state files into its working directory: keep them out of the tree.
    c.arg("--verify_state_save=0").current_dir(s.dir());
    run(&mut c, T)
}

fn write_verify_restart_verify(job: &[&str], image_size: u64) {
    let _h = heavy();
    let mut s = Server::start();
    let tok = token::token(&token::image_id("fio"), image_size);
    let out = fio(&s, &tok, job, &["--do_verify=1"]).ok();
    assert!(out.stdout.contains("mvps: (groupid=0"), "{out}");
    s.terminate();
    s.restart();
    let out = fio(&s, &tok, job, &["--verify_only"]).ok();
    assert!(!out.all().contains("verify: bad"), "{out}");
    // The check can fail: the same verification against a fresh image does.
    let fresh = token::token(&token::image_id("fio-fresh"), image_size);
    let out = fio(&s, &fresh, job, &["--verify_only"]).fails();
    assert!(out.all().contains("verify"), "{out}");
}

#[test]
fn random_4k_writes_verify_with_crc32c() {
    write_verify_restart_verify(&["--bs=4k", "--size=64M", "--iodepth=16"], 64 << 20);
}

#[test]
fn random_unaligned_3000_byte_writes_verify_with_crc32c() {
    write_verify_restart_verify(&["--bs=3000", "--size=24000000", "--iodepth=32"], 32 << 20);
}
