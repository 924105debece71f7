//! Checkpoints make data independent of the buffer store (DESIGN §5, §7, and the seed README:
//! losing a buffer store loses only what was not yet checkpointed, and transactional
//! consistency is preserved). With `--checkpoint-interval-ms 200`, data is written, a
//! manifest appears under `<image-store>/images/<id>/`, the server is killed with SIGKILL and
//! its buffer store deleted: after a restart the checkpointed data is still there. Then
//! writes made while uploads are disabled are lost as a whole when the buffer store is lost
//! again, and the checkpointed data shows through unchanged.

use mvps_conformance::manifest;
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SIZE: u64 = 64 << 20;

/// Manifests of an image, each checked to be named `<16 lowercase hex digits>.json`.
fn manifests(s: &Server, image_id: &str) -> Vec<PathBuf> {
    let dir = s.image_store().join("images").join(image_id);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(gen) = name.strip_suffix(".json") {
            let hex =
                gen.len() == 16 && gen.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            assert!(
                hex,
                "manifest name {name:?} is not <16 lowercase hex>.json (DESIGN §3)"
            );
            out.push(p);
        }
    }
    out
}

/// Waits until the newest manifest's layers hold `pages` pages (each written once), then
/// checks every manifest is a JSON object.
fn wait_for_checkpoint(s: &Server, image_id: &str, pages: u64) {
    let store = s.image_store();
    manifest::wait_for_pages(pages, Duration::from_secs(60), || {
        manifest::newest_local(&store, image_id)
    });
    for p in manifests(s, image_id) {
        let text = std::fs::read_to_string(&p).unwrap();
        let v: Result<serde_json::Value, _> = serde_json::from_str(&text);
        assert!(
            v.is_ok_and(|v| v.is_object()),
            "manifest {} is not a JSON object",
            p.display()
        );
    }
}

fn remove_dir(p: &Path) {
    std::fs::remove_dir_all(p).unwrap_or_else(|e| panic!("removing {}: {e}", p.display()));
}

#[test]
fn checkpointed_data_survives_losing_the_buffer_store() {
    let mut s = Server::builder()
        .args([
            "--checkpoint-interval-ms",
            "200",
            "--checkpoint-interval-jitter-ms",
            "0",
        ])
        .start();
    let id = token::image_id("ckpt");
    let tok = token::token(&id, SIZE);
    let (a, b) = (pattern(10, 3 << 20), pattern(11, 5000));
    let mut c = s.open(&tok);
    c.write(1 << 20, &a).unwrap();
    c.write(40_000_001, &b).unwrap();
    c.flush().unwrap();
    // 768 pages of `a`, 2 of `b`.
    wait_for_checkpoint(&s, &id, 770);
    drop(c);

    s.kill9();
    remove_dir(&s.buffer_store());
    s.restart();
    let mut c = s.open(&tok);
    assert!(
        c.read(1 << 20, a.len() as u32) == Ok(a.clone()),
        "checkpointed data lost"
    );
    assert!(
        c.read(40_000_001, b.len() as u32) == Ok(b.clone()),
        "checkpointed data lost"
    );
    assert_eq!(c.read(0, 4096), Ok(vec![0; 4096]));
    drop(c);

    // Phase 2: writes buffered but never uploaded are lost together with the buffer store.
    s.kill9();
    s.args_mut().push("--disable-image-store-write".into());
    s.restart();
    let before = manifests(&s, &id).len();
    let mut c = s.open(&tok);
    c.write((1 << 20) + 4096, &[0xcc; 10_000]).unwrap(); // overwrites part of `a`
    c.write(50 << 20, &[0xdd; 8192]).unwrap();
    c.flush().unwrap();
    assert_eq!(c.read(50 << 20, 4), Ok(vec![0xdd; 4]));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        manifests(&s, &id).len(),
        before,
        "--disable-image-store-write wrote a manifest"
    );
    drop(c);

    s.kill9();
    remove_dir(&s.buffer_store());
    s.args_mut().pop();
    s.restart();
    let mut c = s.open(&tok);
    assert!(
        c.read(1 << 20, a.len() as u32) == Ok(a),
        "checkpointed data damaged"
    );
    assert!(
        c.read(40_000_001, b.len() as u32) == Ok(b),
        "checkpointed data damaged"
    );
    assert_eq!(
        c.read(50 << 20, 8192),
        Ok(vec![0; 8192]),
        "un-checkpointed write resurrected"
    );
}

#[test]
fn restart_combines_checkpointed_layers_with_the_buffer() {
    let mut s = Server::builder()
        .args([
            "--checkpoint-interval-ms",
            "200",
            "--checkpoint-interval-jitter-ms",
            "0",
        ])
        .start();
    let id = token::image_id("ckpt-mix");
    let tok = token::token(&id, SIZE);
    let base = pattern(20, 1 << 20);
    let mut c = s.open(&tok);
    c.write(0, &base).unwrap();
    c.flush().unwrap();
    wait_for_checkpoint(&s, &id, 256);
    // Newer writes on top of checkpointed pages, partly unaligned; killed before or after
    // their own checkpoint, they must win over the older layer either way.
    let top = pattern(21, 10_000);
    c.write(4000, &top).unwrap();
    c.trim(512 << 10, 64 << 10).unwrap();
    s.kill9();
    s.restart();
    let mut expect = base;
    expect[4000..14_000].copy_from_slice(&top);
    expect[512 << 10..576 << 10].fill(0);
    let got = s.open(&tok).read(0, 1 << 20).unwrap();
    assert!(
        got == expect,
        "layers and buffer combined wrongly after restart"
    );
}
