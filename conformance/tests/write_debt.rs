//! Write debt stays bounded under sustained writes (DESIGN §7). fio keeps random 4 KiB writes
//! (uniform, with repeats: `--norandommap`) going at queue depth 32 for many passes over the
//! image while checkpoints run every 300 ms; a sampler reads the newest manifest all along
//! and measures its debt from the layers. Counts, not times: the run is a fixed number of
//! bytes, and every sample must be within the hard limits (writes wait for compaction past
//! them); once writing stops, compaction settles within the policy's limits. Then fio's
//! `--verify_only` passes, also from a new buffer store (the layers alone). Guards the
//! regression this suite was written for: compaction held off while writes were busy, and
//! layers, stored bytes and memory growing at the ingest rate.

use mvps::engine::compaction;
use mvps::engine::debt::{self, Debt};
use mvps::engine::manifest;
use mvps::store::local::LocalStore;
use mvps_conformance::bins;
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, heavy, run, wait_for, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const IMAGE: u64 = 256 << 20;
/// Bytes fio writes: six times the image.
const WRITTEN: u64 = 6 * IMAGE;

/// fio's crc32c verification of the last pass.
const VERIFY: [&str; 3] = [
    "--verify=crc32c",
    "--verify_fatal=1",
    "--verify_state_save=0",
];

fn fio<S: AsRef<std::ffi::OsStr>>(s: &Server, tok: &str, extra: &[S]) -> Output {
    let uri = format!("--uri={}", s.uri(tok));
    let mut c = cmd(
        "fio",
        ["--name=debt", "--ioengine=nbd", &uri, "--rw=randwrite"],
    );
    c.args(["--bs=4k", "--iodepth=32", "--size=256M", "--randseed=77"]);
    c.args(extra).current_dir(s.dir());
    run(&mut c, Duration::from_secs(900))
}

fn debt_now(store: &LocalStore, image: &str) -> Option<Debt> {
    let m = manifest::load_latest(store, image).ok()??;
    // A blob listed by a manifest is never deleted (no collector runs here): reading can
    // only fail on a bug.
    Some(compaction::measure(store, &m).expect("measuring the newest manifest"))
}

#[test]
fn sustained_random_writes_stay_within_the_debt_limits() {
    let _h = heavy();
    let mut s = Server::builder()
        .args([
            "--checkpoint-interval-ms",
            "300",
            "--checkpoint-interval-jitter-ms",
            "0",
        ])
        .start();
    let image = token::image_id("debt");
    let tok = token::token(&image, IMAGE);
    let store = Arc::new(LocalStore::open(&s.image_store()).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (store, image, done) = (store.clone(), image.clone(), done.clone());
        std::thread::spawn(move || {
            let mut samples: Vec<Debt> = Vec::new();
            while !done.load(Ordering::Acquire) {
                samples.extend(debt_now(&store, &image));
                std::thread::sleep(Duration::from_millis(250));
            }
            samples
        })
    };
    // Uniform random with repeats, as a database's writes are; the written bytes fix the
    // run's length whatever the machine's speed.
    let io_size = format!("--io_size={WRITTEN}");
    let out = fio(&s, &tok, &["--norandommap", &io_size]).ok();
    assert!(out.stdout.contains("debt: (groupid=0"), "{out}");
    // A last pass over every block in random order, with verify headers (fio cannot verify
    // blocks it overwrote), on top of the churned layers while compaction is still busy.
    let out = fio(&s, &tok, &[&VERIFY[..], &["--do_verify=0"]].concat()).ok();
    done.store(true, Ordering::Release);
    let samples = sampler.join().unwrap();
    assert!(out.stdout.contains("debt: (groupid=0"), "{out}");
    let checkpoints = s.log().matches(": checkpoint: ").count();
    assert!(
        checkpoints >= 8,
        "only {checkpoints} checkpoints\n{}",
        s.log_tail()
    );
    assert!(samples.len() >= 8, "only {} samples", samples.len());
    let p = debt::Policy::DEFAULT;
    for d in &samples {
        // Past the stop threshold writes wait; the buffer they filled before may still
        // add a checkpoint or two.
        assert!(
            d.read_depth <= debt::READ_DEPTH_STOP + 2,
            "{d:?}\n{samples:?}"
        );
        assert!(
            !p.stored_past(d, debt::STORED_PER_LIVE_STOP + 1),
            "{d:?}\n{samples:?}"
        );
    }
    let merged = s.log().matches(" base layer(s)").count();
    assert!(
        merged >= 1,
        "no delta ever merged into the base\n{}",
        s.log_tail()
    );
    // Writing stopped: compaction settles within the policy's own limits.
    let settled = wait_for("compaction to settle", Duration::from_secs(120), || {
        debt_now(&store, &image).filter(|d| {
            d.deltas <= debt::DELTAS_MAX
                && d.read_depth <= debt::READ_DEPTH_MAX
                && !p.stored_past(d, debt::STORED_PER_LIVE_MAX)
        })
    });
    assert!(settled.layers <= p.layers_limit(IMAGE), "{settled:?}");
    eprintln!(
        "{} samples, deepest {:?}, settled {settled:?}, {checkpoints} checkpoints, {merged} base merges",
        samples.len(),
        samples.iter().max_by_key(|d| d.read_depth)
    );
    let verify_only = || {
        VERIFY
            .iter()
            .map(|a| a.to_string())
            .chain(["--verify_only".into()])
            .collect::<Vec<_>>()
    };
    let out = fio(&s, &tok, &verify_only()).ok();
    assert!(!out.all().contains("verify: bad"), "{out}");
    // The check can fail: the same verification of a fresh image does.
    let fresh = token::token(&token::image_id("debt-fresh"), IMAGE);
    fio(&s, &fresh, &verify_only()).fails();
    // From the layers alone: a stop (which drains the buffer), then a new buffer store.
    let st = s.terminate();
    assert_eq!(st.code(), Some(0), "{st}");
    // The operator sees the same debt (the server stopped: the manifest holds still).
    let mut ctl = std::process::Command::new(bins::bin("mvpsctl"));
    ctl.args(["inspect", "--image-id", &image, "--image-store-local-path"])
        .arg(s.image_store());
    let out = run(&mut ctl, Duration::from_secs(60)).ok();
    let shown: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("one JSON line");
    let now = debt_now(&store, &image).unwrap();
    assert_eq!(
        (
            shown["layers"].as_u64(),
            shown["read_depth"].as_u64(),
            shown["live_bytes"].as_u64()
        ),
        (
            Some(now.layers as u64),
            Some(now.read_depth as u64),
            Some(now.live_bytes)
        ),
        "{out}"
    );
    std::fs::remove_dir_all(s.buffer_store()).unwrap();
    s.restart();
    let out = fio(&s, &tok, &verify_only()).ok();
    assert!(!out.all().contains("verify: bad"), "{out}");
}
