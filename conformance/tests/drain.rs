//! A graceful stop pays the write debt (DESIGN §7): SIGTERM with a client still connected and
//! writes replied but never flushed or checkpointed; the server checkpoints every open image
//! before it exits, so a new buffer store (the old one thrown away, as when an operator moves
//! images to another server) reads every replied write — on the local image store and on S3.
//! A drain cut short by its timeout keeps the rest in the WAL, and says so.

mod s3_common;

use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;

/// ~300 pages at scattered offsets (4 KiB each, some straddling pages), replied, never flushed.
fn scattered_writes(image_bytes: u64) -> Vec<(u64, Vec<u8>)> {
    (0..300u64)
        .map(|i| {
            let off = (i * 7_919 * 4096 + i * 513) % (image_bytes - 8192);
            (off, pattern(i, 4096))
        })
        .collect()
}

/// Writes, SIGTERM with the client connected, checks the drain's log line, throws the buffer
/// store away, restarts, and reads every write back.
fn stop_drains_then_new_buffer_store_reads_everything(mut s: Server, name: &str) {
    let image_bytes = 256u64 << 20;
    let image = token::image_id(name);
    let tok = token::token(&image, image_bytes);
    let writes = scattered_writes(image_bytes);
    let mut c = s.open(&tok);
    for (off, data) in &writes {
        c.write(*off, data).unwrap();
    }
    // Still connected: the stop has to finish this connection first.
    let st = s.terminate();
    assert_eq!(st.code(), Some(0), "SIGTERM exit: {st}\n{}", s.log_tail());
    assert!(
        s.log().contains(&format!("image {image}: drained in")),
        "no drain logged\n{}",
        s.log_tail()
    );
    drop(c);
    std::fs::remove_dir_all(s.buffer_store()).unwrap();
    s.restart();
    let mut c = s.open(&tok);
    // Later writes win where two overlap: replay them in order into a model.
    let mut model = std::collections::BTreeMap::new();
    for (off, data) in &writes {
        for (i, b) in data.iter().enumerate() {
            model.insert(off + i as u64, *b);
        }
    }
    for (off, data) in &writes {
        let got = c.read(*off, data.len() as u32).unwrap();
        let want: Vec<u8> = (0..data.len() as u64).map(|i| model[&(off + i)]).collect();
        assert!(got == want, "replied write at {off} lost over the stop");
    }
}

#[test]
fn local_store_stop_drains_the_buffer() {
    // Default flags: checkpoints every 60 s, so only the drain can have moved the writes.
    stop_drains_then_new_buffer_store_reads_everything(Server::start(), "drain-local");
}

#[test]
fn s3_store_stop_drains_the_buffer() {
    let s3 = s3_common::S3::new();
    let s = s3.server().start();
    stop_drains_then_new_buffer_store_reads_everything(s, "drain-s3");
}

#[test]
fn drain_cut_short_keeps_the_rest_in_the_wal() {
    let mut s = Server::builder().args(["--drain-timeout-ms", "0"]).start();
    let image = token::image_id("drain-cut");
    let tok = token::token(&image, 64 << 20);
    let data = pattern(9, 300_000);
    let mut c = s.open(&tok);
    c.write(4096 * 3 + 17, &data).unwrap();
    let st = s.terminate();
    assert_eq!(st.code(), Some(0), "SIGTERM exit: {st}\n{}", s.log_tail());
    let log = s.log();
    assert!(
        log.contains(&format!("image {image}: drain cut short")) && log.contains("stay in the WAL"),
        "the cut-short drain is not logged\n{}",
        s.log_tail()
    );
    drop(c);
    s.restart(); // same buffer store: the WAL replays
    assert_eq!(
        s.open(&tok).read(4096 * 3 + 17, data.len() as u32),
        Ok(data)
    );
}
