//! S3 faults do not reach NBD clients. `mvps-te` talks to SeaweedFS through the fault proxy
//! (`mvps_conformance::faultproxy`), which fails ~20% of requests (503, 500 after applying
//! the request, connection resets before and after applying it, multi-second stalls) while
//! fio writes random blocks with crc32c verification headers and reads them back. Checkpoints
//! run every 200 ms meanwhile, so uploads, conditional manifest creates and ranged reads of
//! layers all meet faults.
//!
//! Asserted: fio sees no error and no bad block; the faults really happened; once faults
//! stop, a manifest with exactly fio's number of writes as its change count appears; and a
//! second server with a fresh buffer store, reading only from S3 (through the proxy, faults
//! on again), verifies every block.
//!
//! The proxy also cuts request bodies short (the store gets the head and part of the body,
//! then the connection closes, as from a client killed mid-PUT). The S3 client's own test
//! here checks that such a PUT never leaves an object behind and that its retries get
//! through: no conditional create is falsely refused.

mod s3_common;

use mvps::s3::S3Store;
use mvps::store::{CreateOutcome, Error as StoreError, ImageStore};
use mvps_conformance::faultproxy::{Fault, FaultProxy};
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, heavy, run, Output};
use s3_common::{fio_writes, PREFIX, S3};
use std::time::Duration;

const T: Duration = Duration::from_secs(300);
const SIZE: u64 = 32 << 20;

fn fio(s: &Server, tok: &str, extra: &[&str]) -> Output {
    let uri = format!("--uri={}", s.uri(tok));
    let mut c = cmd(
        "fio",
        ["--name=s3faults", "--ioengine=nbd", &uri, "--rw=randwrite"],
    );
    c.args([
        "--bs=4k",
        "--size=24M",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--randseed=977",
        "--verify_state_save=0",
    ]);
    c.args(extra);
    run(&mut c, T)
}

#[test]
fn fio_verifies_through_s3_faults_and_checkpoints_land_after() {
    let _h = heavy();
    let mut s3 = S3::new();
    let proxy = FaultProxy::start(&s3.endpoint, 0.2, 0x6d76_7073);
    proxy.set_stall(Duration::from_secs(2));
    s3.endpoint = proxy.endpoint();
    // The startup check runs fault-free; everything after it meets faults.
    let mut a = s3.start(&[]);
    proxy.set_faults(true);
    let id = token::image_id("s3-faults");
    let tok = token::token(&id, SIZE);

    // Writes paced to ~8 s, so that some 40 checkpoints (uploads, manifests, layer opens)
    // happen while fio runs.
    let out = fio(&a, &tok, &["--do_verify=1", "--rate_iops=,800"]).ok();
    assert!(!out.all().contains("verify: bad"), "{out}");
    let writes = fio_writes(&out.stdout);
    assert_eq!(
        writes, 6144,
        "fio issued an unexpected number of writes: {out}"
    );
    let during = proxy.counts();
    assert!(
        during.failed() >= 5 && during.stalled >= 1,
        "too few faults injected to mean anything: {during:?}"
    );
    assert!(
        a.log().contains("retrying in"),
        "no S3 retry was logged\n{}",
        a.log_tail()
    );

    // Faults off: the checkpoint loop catches up and publishes every write.
    proxy.set_faults(false);
    let m = s3.wait_for_changes(&id, writes, Duration::from_secs(90));
    assert_eq!(m.change_count, writes, "manifest {m:?}");
    assert!(!m.layers.is_empty());
    a.assert_running();
    a.kill9();

    // A fresh buffer store: every block must come from S3, faults on again.
    proxy.set_faults(true);
    let b = s3.start(&[]);
    let out = fio(&b, &tok, &["--verify_only"]).ok();
    assert!(!out.all().contains("verify: bad"), "{out}");
    let after = proxy.counts();
    assert!(
        after.failed() > during.failed(),
        "no faults during the verify pass: {after:?}"
    );
    proxy.set_faults(false);
    // The check can fail: verifying a never-written image through the same path does.
    let fresh = token::token(&token::image_id("s3-faults-fresh"), SIZE);
    let out = fio(&b, &fresh, &["--verify_only"]).fails();
    assert!(out.all().contains("verify"), "{out}");
    eprintln!("fault proxy: {after:?}");
}

/// A store client of `s3`'s bucket whose requests go through `proxy`.
fn store_through(s3: &S3, proxy: &FaultProxy) -> S3Store {
    let mut config = s3.weed.config(&s3.bucket, PREFIX);
    config.endpoint = Some(proxy.endpoint());
    S3Store::open(config).expect("opening the S3 store")
}

/// A manifest-like body of about `len` bytes.
fn body(i: u64, len: usize) -> Vec<u8> {
    let pad: String = (0..len)
        .map(|j| (b'a' + ((i as usize + j) % 26) as u8) as char)
        .collect();
    format!("{{\"format_version\": 1, \"generation\": {i}, \"pad\": \"{pad}\"}}").into_bytes()
}

/// PUTs cut short on the way (half of the requests: the store gets the head and part of the
/// body, often none of it, then the connection closes) are never stored, so the client's
/// retries get through: every conditional create is Created and every object reads back
/// whole, a multipart upload completes, and a create whose every attempt is cut leaves
/// nothing behind. Without `Content-MD5` on the PUTs, SeaweedFS keeps a PUT cut after its
/// head as an empty object: the retry of a conditional create then finds the key taken by
/// something that is not its body and reports `AlreadyExists`, which fences a checkpoint.
#[test]
fn cut_short_puts_are_never_stored_and_retries_get_through() {
    let s3 = S3::new();
    let direct = s3.store();
    let proxy = FaultProxy::start(&s3.endpoint, 0.5, 0x6375_7421);
    proxy.set_kinds(&[Fault::CutBody]);
    let through = store_through(&s3, &proxy);
    proxy.set_faults(true);
    for i in 1..=40u64 {
        let key = format!("images/cut.mvps-image/{:016x}.json", u64::MAX - i);
        let b = body(i, (i as usize * 997) % 6000);
        assert_eq!(
            through.create_if_absent(&key, &b).unwrap(),
            CreateOutcome::Created,
            "{key}: {:?}",
            proxy.counts()
        );
        assert_eq!(direct.get(&key).unwrap(), b, "{key}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let data: Vec<u8> = (0..(40u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &data).unwrap();
    through.put_file("blobs/cut.mvps-blob", &path).unwrap();
    assert!(
        direct.get("blobs/cut.mvps-blob").unwrap() == data,
        "multipart object differs"
    );
    let counts = proxy.counts();
    assert!(
        counts.cut_body >= 10,
        "too few cuts to mean anything: {counts:?}"
    );

    // Every attempt cut: the create fails and leaves nothing; a later create succeeds.
    let all = FaultProxy::start(&s3.endpoint, 1.0, 7);
    all.set_kinds(&[Fault::CutBody]);
    let through = store_through(&s3, &all);
    all.set_faults(true);
    let key = "images/cut.mvps-image/0000000000000000.json";
    let b = body(0, 300);
    let e = through.create_if_absent(key, &b).unwrap_err();
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
    assert_eq!(all.counts().cut_body, all.counts().total());
    assert!(
        matches!(direct.get(key), Err(StoreError::NotFound { .. })),
        "a cut-short PUT left an object"
    );
    assert_eq!(
        direct.create_if_absent(key, &b).unwrap(),
        CreateOutcome::Created
    );
    eprintln!("fault proxy: {counts:?}");
}
