//! Transmission-phase semantics through the raw client (DESIGN §2, §6): unwritten pages read
//! as zeros; TRIM and WRITE_ZEROES (with and without NO_HOLE) zero exactly their range at any
//! byte offset; FUA and FLUSH succeed; many requests in flight on one connection are all
//! answered, each under its own handle, with the right data; every connection of an image sees
//! a replied write at once (CAN_MULTI_CONN); pages of 512 bytes and of 64 KiB work at
//! unaligned offsets; DISC closes the connection. Guards off-by-one range handling, requests
//! answered under the wrong handle, and caches that are per connection.

use mvps_conformance::nbd::{self, Client};
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;
use std::collections::HashMap;

const SIZE: u64 = 64 << 20;

fn open(s: &Server, tag: &str) -> (Client, String) {
    let tok = token::token(&token::image_id(tag), SIZE);
    (s.open(&tok), tok)
}

#[test]
fn unwritten_pages_read_as_zeros_everywhere() {
    let s = Server::start();
    let (mut c, _) = open(&s, "zeros");
    assert_eq!(c.read(0, 1), Ok(vec![0]));
    assert_eq!(c.read(12_345, 70_000), Ok(vec![0; 70_000]));
    assert_eq!(c.read(SIZE - 1, 1), Ok(vec![0]));
    assert!(c
        .read(SIZE - (32 << 20), 32 << 20)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn trim_and_write_zeroes_zero_exactly_their_range() {
    let s = Server::start();
    let (mut c, _) = open(&s, "trim");
    let data = pattern(50, 256 << 10);
    c.write(0, &data).unwrap();
    let mut expect = data.clone();
    for (off, len, how) in [
        (4096u64, 8192u32, "trim"),
        (10_001, 3, "trim"),
        (50_000, 70_000, "zero"),
        (131_071, 2, "zero-nohole"),
        (200_000, 4096, "zero-nohole"),
    ] {
        match how {
            "trim" => c.trim(off, len).unwrap(),
            "zero" => c.write_zeroes(off, len, 0).unwrap(),
            _ => c.write_zeroes(off, len, nbd::CMD_FLAG_NO_HOLE).unwrap(),
        }
        expect[off as usize..(off + u64::from(len)) as usize].fill(0);
        let got = c.read(0, data.len() as u32).unwrap();
        assert!(got == expect, "after {how} of {len} at {off}: wrong bytes");
    }
    // A big TRIM and WRITE_ZEROES (no payload) beyond the 32 MiB payload cap is fine.
    c.write(SIZE - 4096, &[1; 4096]).unwrap();
    c.trim(0, (SIZE - 4096) as u32).unwrap();
    c.write_zeroes(SIZE - (40 << 20), 40 << 20, 0).unwrap();
    assert_eq!(c.read(0, 4096), Ok(vec![0; 4096]));
    assert_eq!(c.read(SIZE - 4096, 4096), Ok(vec![0; 4096]));
}

#[test]
fn fua_writes_and_flushes_succeed() {
    let s = Server::start();
    let (mut c, _) = open(&s, "fua");
    c.write_fua(77, b"forced unit access").unwrap();
    c.flush().unwrap();
    c.flush().unwrap(); // nothing new to sync
    assert_eq!(c.read(77, 18), Ok(b"forced unit access".to_vec()));
    assert_eq!(
        c.request(nbd::CMD_FLAG_FUA, nbd::CMD_WRITE_ZEROES, 77, 6, &[]),
        Ok(vec![])
    );
    assert_eq!(c.read(77, 18), Ok(b"\0\0\0\0\0\0 unit access".to_vec()));
}

#[test]
fn many_requests_in_flight_are_each_answered_under_their_handle() {
    let s = Server::start();
    let (mut c, _) = open(&s, "inflight");
    // 48 writes of different blocks, then 48 reads of them, without waiting in between.
    let block = |i: u64| pattern(100 + i, 5000 + i as usize);
    let off = |i: u64| i * 20_000 + 3;
    let mut writes = HashMap::new();
    for i in 0..48 {
        let d = block(i);
        writes.insert(
            c.send_request(0, nbd::CMD_WRITE, off(i), d.len() as u32, &d)
                .unwrap(),
            i,
        );
    }
    for _ in 0..48 {
        let (h, r) = c.read_reply().unwrap();
        assert!(
            writes.remove(&h).is_some(),
            "reply for an unknown or repeated handle {h}"
        );
        assert_eq!(r, Ok(vec![]));
    }
    let mut reads = HashMap::new();
    for i in 0..48 {
        let len = block(i).len() as u32;
        reads.insert(
            c.send_request(0, nbd::CMD_READ, off(i), len, &[]).unwrap(),
            i,
        );
    }
    // A FLUSH in the middle of the stream is answered too.
    let flush = c.send_request(0, nbd::CMD_FLUSH, 0, 0, &[]).unwrap();
    let mut flushed = false;
    for _ in 0..49 {
        let (h, r) = c.read_reply().unwrap();
        if h == flush {
            assert_eq!(r, Ok(vec![]));
            flushed = true;
            continue;
        }
        let i = reads
            .remove(&h)
            .unwrap_or_else(|| panic!("unknown or repeated handle {h}"));
        assert!(r == Ok(block(i)), "read {i} returned wrong data");
    }
    assert!(flushed && reads.is_empty());
}

#[test]
fn every_connection_sees_a_replied_write_at_once() {
    let s = Server::start();
    let (mut a, tok) = open(&s, "multiconn");
    let mut conns: Vec<Client> = (0..3).map(|_| s.open(&tok)).collect();
    for round in 0..20u64 {
        let data = pattern(round, 3000);
        let off = round * 1000 + 1; // overlapping, unaligned
        a.write(off, &data).unwrap();
        for c in conns.iter_mut() {
            assert!(
                c.read(off, 3000) == Ok(data.clone()),
                "round {round}: stale read"
            );
        }
        // And the other direction.
        conns[round as usize % 3].write(off + 500, b"xy").unwrap();
        assert_eq!(a.read(off + 500, 2), Ok(b"xy".to_vec()));
    }
}

#[test]
fn small_and_large_pages_work_at_unaligned_offsets() {
    let s = Server::start();
    for bits in [9u32, 16] {
        let mut cl = token::claims(&token::image_id("pages"), 4 << 20);
        cl.page_size_bits = bits;
        let mut c = s.open(&token::mint(&cl));
        let page = 1u64 << bits;
        let data = pattern(u64::from(bits), 3 * page as usize + 5);
        c.write(page - 3, &data).unwrap();
        c.write(2 * page + 1, b"\x01\x02").unwrap();
        let mut expect = vec![0u8; 5 * page as usize];
        expect[page as usize - 3..][..data.len()].copy_from_slice(&data);
        expect[2 * page as usize + 1..][..2].copy_from_slice(b"\x01\x02");
        let got = c.read(0, expect.len() as u32).unwrap();
        assert!(got == expect, "page size {page}: wrong bytes");
        c.disconnect();
    }
}

#[test]
fn disc_closes_the_connection_after_pending_replies() {
    let s = Server::start();
    let (mut c, tok) = open(&s, "disc");
    let h = c.send_request(0, nbd::CMD_WRITE, 9, 4, b"last").unwrap();
    c.send_request(0, nbd::CMD_DISC, 0, 0, &[]).unwrap();
    let (got, r) = c.read_reply().expect("the write before DISC is answered");
    assert_eq!((got, r), (h, Ok(vec![])));
    assert!(c.closed_within(std::time::Duration::from_secs(10)));
    assert_eq!(s.open(&tok).read(9, 4), Ok(b"last".to_vec()));
}

/// Requests on one connection are served concurrently: while another connection holds the
/// image's write lock (LOCK_TXN), a plain WRITE waits for it, and READs sent after that WRITE
/// on the same connection are answered meanwhile. When the lock goes (ROLLBACK), the WRITE
/// completes. Guards a server that serves one request of a connection at a time.
#[test]
fn reads_are_answered_while_a_write_of_the_same_connection_waits() {
    let s = Server::builder()
        .args(["--txn-lock-timeout-ms", "20000"])
        .start();
    let (mut holder, tok) = open(&s, "concurrent");
    holder.write(0, &pattern(1, 4096)).unwrap();
    let mut c = s.open(&tok);
    assert_eq!(
        holder.request(0, nbd::CMD_MVPS_BEGIN_TXN, 0, 0, &[]),
        Ok(vec![])
    );
    assert_eq!(
        holder.request(0, nbd::CMD_MVPS_LOCK_TXN, 0, 0, &[]),
        Ok(vec![])
    );
    let w = c
        .send_request(0, nbd::CMD_WRITE, 8192, 4096, &pattern(2, 4096))
        .unwrap();
    let reads: Vec<u64> = (0..4)
        .map(|_| c.send_request(0, nbd::CMD_READ, 0, 4096, &[]).unwrap())
        .collect();
    for _ in &reads {
        let (h, reply) = c.read_reply().unwrap();
        assert!(
            reads.contains(&h),
            "reply {h} came before the reads' (write is {w})"
        );
        assert_eq!(reply, Ok(pattern(1, 4096)));
    }
    assert_eq!(
        holder.request(0, nbd::CMD_MVPS_ROLLBACK_TXN, 0, 0, &[]),
        Ok(vec![])
    );
    let (h, reply) = c.read_reply().unwrap();
    assert_eq!((h, reply), (w, Ok(vec![])));
    assert_eq!(c.read(8192, 4096), Ok(pattern(2, 4096)));
}
