//! Crash consistency of the durability contract (DESIGN §5) against SIGKILL of the server:
//! - a write that was FLUSHed survives;
//! - a write that was only *replied* (no FLUSH, no FUA) survives too: it is in the WAL in the
//!   OS page cache, which a process kill does not lose;
//! - TRIM and WRITE_ZEROES replies survive the same way;
//! - with a writer streaming requests when the kill lands, every replied write is there after
//!   restart, and an overwritten region shows the newest replied version.
//!
//! Guards a WAL that is buffered in user space, replayed incompletely, or whose torn tail
//! breaks recovery.

use mvps_conformance::nbd;
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
fn flushed_write_survives_kill_9() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("crash-flush"), 64 * MIB);
    let data = pattern(1, MIB as usize + 333);
    let mut c = s.open(&tok);
    c.write(5 * MIB + 7, &data).unwrap();
    c.flush().unwrap();
    s.kill9();
    s.restart();
    let mut c = s.open(&tok);
    assert!(
        c.read(5 * MIB + 7, data.len() as u32) == Ok(data),
        "flushed data lost"
    );
    assert_eq!(c.read(5 * MIB, 7), Ok(vec![0; 7]));
}

#[test]
fn replied_write_without_flush_survives_kill_9() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("crash-noflush"), 64 * MIB);
    let (a, b) = (pattern(2, 200_000), pattern(3, 4096));
    let mut c = s.open(&tok);
    c.write(12_345, &a).unwrap();
    c.write(16_384, &b).unwrap(); // overwrites part of `a`, page aligned
    c.write(100, &[0xee; 10]).unwrap();
    s.kill9();
    s.restart();
    let mut expect = vec![0u8; 300_000];
    expect[12_345..12_345 + a.len()].copy_from_slice(&a);
    expect[16_384..16_384 + b.len()].copy_from_slice(&b);
    expect[100..110].copy_from_slice(&[0xee; 10]);
    let got = s.open(&tok).read(0, expect.len() as u32).unwrap();
    assert!(got == expect, "replied writes lost or mixed up by kill -9");
}

#[test]
fn fua_write_survives_kill_9() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("crash-fua"), 16 * MIB);
    let data = pattern(4, 70_000);
    s.open(&tok).write_fua(3, &data).unwrap();
    s.kill9();
    s.restart();
    assert!(s.open(&tok).read(3, data.len() as u32) == Ok(data));
}

#[test]
fn trim_and_write_zeroes_survive_kill_9() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("crash-trim"), 16 * MIB);
    let data = pattern(5, 64 * 1024);
    let mut c = s.open(&tok);
    c.write(0, &data).unwrap();
    c.flush().unwrap();
    c.trim(4096, 8192).unwrap();
    c.write_zeroes(20_000, 1000, 0).unwrap();
    s.kill9();
    s.restart();
    let mut expect = data.clone();
    expect[4096..12_288].fill(0);
    expect[20_000..21_000].fill(0);
    assert!(s.open(&tok).read(0, expect.len() as u32) == Ok(expect));
}

#[test]
fn every_replied_write_survives_a_kill_9_in_mid_stream() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("crash-stream"), 1 << 30);
    // Block i (8 KiB + 100 bytes, so blocks straddle pages) holds pattern(1000 + i); block
    // 0 is rewritten every 10th step with pattern(step) so the newest version is checkable.
    // The writer goes on until the kill breaks its connection.
    const BLOCK: u64 = 8192 + 100;
    let mut c = s.open(&tok);
    let writer = std::thread::spawn(move || {
        let mut acked: Vec<u64> = Vec::new();
        let mut newest_block0 = None;
        for i in 1..120_000u64 {
            let (off, seed) = if i % 10 == 0 {
                (0, i)
            } else {
                (i * BLOCK, 1000 + i)
            };
            let data = pattern(seed, BLOCK as usize);
            if c.send_request(0, nbd::CMD_WRITE, off, BLOCK as u32, &data)
                .is_err()
            {
                break;
            }
            match c.read_reply() {
                Ok((_, Ok(_))) if off == 0 => newest_block0 = Some(seed),
                Ok((_, Ok(_))) => acked.push(i),
                Ok((_, Err(e))) => panic!("write {i} failed with error {e}"),
                Err(_) => break, // the server died under us
            }
        }
        (acked, newest_block0)
    });
    std::thread::sleep(Duration::from_millis(500));
    s.kill9();
    let (acked, newest_block0) = writer.join().unwrap();
    assert!(
        acked.len() > 40,
        "too few writes before the kill: {}",
        acked.len()
    );
    s.restart();
    let mut c = s.open(&tok);
    for i in acked {
        let got = c.read(i * BLOCK, BLOCK as u32).unwrap();
        assert!(
            got == pattern(1000 + i, BLOCK as usize),
            "replied write {i} lost"
        );
    }
    if let Some(seed) = newest_block0 {
        let got = c.read(0, BLOCK as u32).unwrap();
        // A later rewrite may have landed without its reply reaching us; it is one of ours.
        let ok = (seed..seed + 100)
            .step_by(10)
            .any(|s| got == pattern(s, BLOCK as usize));
        assert!(
            ok,
            "block 0 is not the newest replied version (seed {seed}) nor a later one"
        );
    }
}
