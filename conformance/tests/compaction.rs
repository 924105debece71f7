//! Compaction keeps an image's layer count bounded however long it is written (DESIGN §7:
//! "merges runs of small adjacent layers into larger ones by size tiers, so the layer count
//! — and read cost — stays bounded"). One small write per checkpoint interval produces one
//! small layer per checkpoint; after 150 checkpoints the newest manifest must list at most
//! 64 layers, and the image must still read back exactly, before and after a SIGKILL.
//! Guards unbounded read amplification and manifests that grow with every checkpoint.
//!
//! A second test rewrites the whole image several times, a checkpoint after each pass: every
//! older layer is then covered by newer ones, and compaction must drop it from the manifest
//! without copying it (docs/FORMAT.md, Compaction), so the newest manifest references exactly
//! one image's worth of data, not one per pass.

use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 << 20;
const CHECKPOINTS: usize = 150;
const LAYERS_MAX: usize = 64;

/// The image's manifests, newest first (names are u64::MAX - generation).
fn manifests(dir: &std::path::Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    v.sort();
    v
}

fn newest_manifest(dir: &std::path::Path) -> serde_json::Value {
    let newest = manifests(dir).into_iter().next().expect("a manifest");
    let text = std::fs::read_to_string(dir.join(&newest)).unwrap();
    serde_json::from_str(&text).expect("manifest is JSON")
}

#[test]
fn layer_count_stays_bounded_over_many_checkpoints() {
    let mut s = Server::builder()
        .args([
            "--checkpoint-interval-ms",
            "50",
            "--checkpoint-interval-jitter-ms",
            "0",
        ])
        .start();
    let id = token::image_id("compact");
    let tok = token::token(&id, SIZE);
    let dir = s.image_store().join("images").join(&id);
    let manifests = || manifests(&dir);
    let mut model = vec![0u8; SIZE as usize];
    let mut c = s.open(&tok);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut i = 0u64;
    while manifests().len() < CHECKPOINTS {
        assert!(
            Instant::now() < deadline,
            "only {} checkpoints in 120 s",
            manifests().len()
        );
        i += 1;
        let off = (i * 7_919_993) % (SIZE - 1000);
        let data = pattern(i, 1000);
        c.write(off, &data).unwrap();
        model[off as usize..off as usize + 1000].copy_from_slice(&data);
        std::thread::sleep(Duration::from_millis(55));
    }
    // Give compaction a moment to catch up with the last checkpoints.
    std::thread::sleep(Duration::from_secs(2));
    let v = newest_manifest(&dir);
    let layers = v["layers"]
        .as_array()
        .expect("manifest has a layers array")
        .len();
    let n = manifests().len();
    assert!(
        layers <= LAYERS_MAX,
        "{layers} layers after {n} checkpoints: nothing compacts"
    );

    for round in 0..2 {
        let mut c = s.open(&tok);
        for off in (0..SIZE).step_by(8 << 20) {
            let got = c.read(off, 8 << 20).unwrap();
            let want = &model[off as usize..(off + (8 << 20)) as usize];
            assert!(
                got == want,
                "image differs in the 8 MiB at {off} (round {round})"
            );
        }
        drop(c);
        s.kill9();
        s.restart();
    }
}

#[test]
fn whole_image_rewrites_leave_one_image_of_layers() {
    const PASSES: u64 = 5;
    let image_pages = SIZE >> 12;
    // No timed checkpoints; one starts when the buffer passes half the throttle threshold,
    // i.e. with the last write of a pass (the buffer then holds the whole image), so each
    // layer is exactly one pass. (The threshold itself is never reached.)
    let threshold = (2 * image_pages - 2).to_string();
    let mut s = Server::builder()
        .args([
            "--checkpoint-interval-ms",
            "3600000",
            "--write-throttle-threshold-pages",
            threshold.as_str(),
        ])
        .start();
    let id = token::image_id("rewrite");
    let tok = token::token(&id, SIZE);
    let dir = s.image_store().join("images").join(&id);
    let checkpoints = |s: &Server| s.log().matches(": checkpoint: ").count();
    let mut c = s.open(&tok);
    let mut model = vec![0u8; SIZE as usize];
    for pass in 0..PASSES {
        let before = checkpoints(&s);
        for off in (0..SIZE).step_by(1 << 20) {
            let data = pattern(pass * 1000 + off / (1 << 20), 1 << 20);
            c.write(off, &data).unwrap();
            model[off as usize..off as usize + (1 << 20)].copy_from_slice(&data);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while checkpoints(&s) == before {
            assert!(Instant::now() < deadline, "no checkpoint after pass {pass}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The compaction pass after the last checkpoint.
    let deadline = Instant::now() + Duration::from_secs(30);
    let data_pages = |v: &serde_json::Value| -> u64 {
        v["layers"]
            .as_array()
            .expect("manifest has a layers array")
            .iter()
            .map(|l| l["data_pages"].as_u64().expect("data_pages"))
            .sum()
    };
    loop {
        let v = newest_manifest(&dir);
        let pages = data_pages(&v);
        if pages <= image_pages {
            assert_eq!(pages, image_pages, "the newest pass is all there");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {PASSES} whole-image passes the manifest still references {pages} data \
             pages for an image of {image_pages}: covered layers were not dropped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        s.log().contains("that newer layers cover"),
        "no layer was dropped as covered:\n{}",
        s.log_tail()
    );
    drop(c);
    for round in 0..2 {
        let mut c = s.open(&tok);
        for off in (0..SIZE).step_by(8 << 20) {
            let got = c.read(off, 8 << 20).unwrap();
            assert!(
                got == model[off as usize..(off + (8 << 20)) as usize],
                "image differs in the 8 MiB at {off} after the rewrites (round {round})"
            );
        }
        drop(c);
        s.kill9();
        s.restart();
    }
}
