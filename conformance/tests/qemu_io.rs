//! qemu's NBD client (`qemu-io`) writing and reading patterns, aligned and not, with every
//! `qemu-io` run a new connection. Guards partial-page read-modify-write (DESIGN §6: any byte
//! offset and length works), zeroes/discard, and that a write replied on one connection is
//! seen by the next one.

use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, run, Output};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// One `qemu-io` run (one NBD connection) with the given `-c` commands; must succeed, and no
/// pattern check may fail.
#[track_caller]
fn qemu_io(s: &Server, tok: &str, cmds: &[&str]) -> Output {
    let out = run_qemu_io(s, tok, cmds).ok();
    assert!(!out.all().contains("verification failed"), "{out}");
    assert!(!out.all().to_lowercase().contains("error"), "{out}");
    out
}

fn run_qemu_io(s: &Server, tok: &str, cmds: &[&str]) -> Output {
    let mut c = cmd("qemu-io", ["--image-opts", &s.qemu_opts(tok)]);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(&mut c, T)
}

#[test]
fn pattern_write_is_read_back_on_a_second_connection() {
    let s = Server::start();
    let tok = token::token(&token::image_id("qio"), 64 << 20);
    let w = qemu_io(&s, &tok, &["write -P 0xab 0 64k"]);
    assert!(
        w.stdout.contains("wrote 65536/65536 bytes at offset 0"),
        "{w}"
    );
    let r = qemu_io(&s, &tok, &["read -P 0xab 0 64k", "read -P 0 64k 64k"]);
    assert!(
        r.stdout.contains("read 65536/65536 bytes at offset 0"),
        "{r}"
    );
    assert!(
        r.stdout.contains("read 65536/65536 bytes at offset 65536"),
        "{r}"
    );
    // The check can fail: a wrong pattern is reported as a failure.
    let bad = run_qemu_io(&s, &tok, &["read -P 0xac 0 64k"]);
    assert!(bad.all().contains("Pattern verification failed"), "{bad}");
}

#[test]
fn unaligned_writes_and_reads_keep_neighbouring_bytes() {
    let s = Server::start();
    let tok = token::token(&token::image_id("qio-unaligned"), 64 << 20);
    qemu_io(&s, &tok, &["write -P 0x11 1000 5000"]);
    qemu_io(
        &s,
        &tok,
        &[
            "read -P 0 0 1000",
            "read -P 0x11 1000 5000",
            "read -P 0x11 1000 1",
            "read -P 0x11 5999 1",
            "read -P 0x11 4095 2",
            "read -P 0 6000 2192",
        ],
    );
    // Overwrite a few bytes across the page boundary at 4096 on another connection.
    qemu_io(&s, &tok, &["write -P 0x22 4090 10"]);
    qemu_io(
        &s,
        &tok,
        &[
            "read -P 0x11 1000 3090",
            "read -P 0x22 4090 10",
            "read -P 0x11 4100 1900",
            "read -P 0 6000 100",
        ],
    );
    // Odd sizes far into the image, one byte, and a run crossing many pages.
    qemu_io(
        &s,
        &tok,
        &["write -P 0x33 33554431 1", "write -P 0x44 40000001 100003"],
    );
    qemu_io(
        &s,
        &tok,
        &[
            "read -P 0 33554430 1",
            "read -P 0x33 33554431 1",
            "read -P 0 33554432 1",
            "read -P 0 40000000 1",
            "read -P 0x44 40000001 100003",
            "read -P 0 40100004 1",
        ],
    );
}

#[test]
fn write_zeroes_and_discard_read_back_as_zeros() {
    let s = Server::start();
    let tok = token::token(&token::image_id("qio-zero"), 16 << 20);
    qemu_io(&s, &tok, &["write -P 0x5a 0 1M"]);
    qemu_io(
        &s,
        &tok,
        &[
            "write -z 4096 8192",
            "discard 65536 65536",
            "write -z 300000 777",
        ],
    );
    qemu_io(
        &s,
        &tok,
        &[
            "read -P 0x5a 0 4096",
            "read -P 0 4096 8192",
            "read -P 0x5a 12288 53248",
            "read -P 0 65536 65536",
            "read -P 0x5a 131072 168928",
            "read -P 0 300000 777",
            "read -P 0x5a 300777 747799",
        ],
    );
}

#[test]
fn the_nbd_uri_form_reads_what_image_opts_wrote() {
    let s = Server::start();
    let tok = token::token(&token::image_id("qio-uri"), 16 << 20);
    qemu_io(&s, &tok, &["write -P 0x77 8191 3"]);
    let out = run(
        &mut cmd(
            "qemu-io",
            ["-f", "raw", "-c", "read -P 0x77 8191 3", &s.uri(&tok)],
        ),
        T,
    )
    .ok();
    assert!(
        out.stdout.contains("read 3/3 bytes at offset 8191"),
        "{out}"
    );
}

#[test]
fn writes_are_visible_to_a_connection_opened_before_them() {
    let s = Server::start();
    let tok = token::token(&token::image_id("qio-live"), 16 << 20);
    // Connection A is open (and has read the old contents) before qemu-io writes.
    let mut a = s.open(&tok);
    assert_eq!(a.read(100_000, 50), Ok(vec![0; 50]));
    qemu_io(&s, &tok, &["write -P 0x99 100000 50"]);
    assert_eq!(
        a.read(99_999, 52),
        Ok([&[0u8][..], &[0x99; 50], &[0]].concat())
    );
    // And the other way round: A writes, qemu-io (a new connection) reads.
    a.write(200_003, &[0x42; 9000]).unwrap();
    qemu_io(
        &s,
        &tok,
        &["read -P 0x42 200003 9000", "read -P 0 209003 1"],
    );
    a.disconnect();
}
