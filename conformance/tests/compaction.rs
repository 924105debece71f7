//! Compaction keeps an image's layer count bounded however long it is written (DESIGN §7:
//! "merges runs of small adjacent layers into larger ones by size tiers, so the layer count
//! — and read cost — stays bounded"). One small write per checkpoint interval produces one
//! small layer per checkpoint; after 150 checkpoints the newest manifest must list at most
//! 64 layers, and the image must still read back exactly, before and after a SIGKILL.
//! Guards unbounded read amplification and manifests that grow with every checkpoint.

use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 << 20;
const CHECKPOINTS: usize = 150;
const LAYERS_MAX: usize = 64;

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
    let manifests = || -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        v.sort(); // names are u64::MAX - generation: the newest sorts first
        v
    };
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
    let newest = manifests().into_iter().next().unwrap();
    let text = std::fs::read_to_string(dir.join(&newest)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("manifest is JSON");
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
