//! Hostile and broken clients, through the raw client: bad tokens (wrong signature, expired,
//! `alg: none`, bad image ids and claims), requests out of range, unknown commands,
//! oversized lengths, garbage instead of a handshake, bad magic, stalled and abandoned
//! connections. Bad requests must get the error DESIGN §6 names and leave the connection
//! usable; only an unparseable stream closes it; and after each the server still serves a
//! fresh good connection. Refused tokens must not be echoed into the log.

use mvps_conformance::nbd::{self, Client, OptError};
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;
use std::io::Write;
use std::time::Duration;

const CLOSE: Duration = Duration::from_secs(10);
const SIZE: u64 = 64 << 20;

/// `tok` is refused with `NBD_REP_ERR_POLICY` on GO and on INFO (the connection staying in
/// the option phase), and the connection is closed on EXPORT_NAME; the log does not show it.
#[track_caller]
fn assert_refused(s: &mut Server, tok: &str) {
    for info in [false, true] {
        let mut c = s.handshake();
        match c.go_or_info(tok, info) {
            Err(OptError::Refused(r)) => assert_eq!(r.typ, nbd::REP_ERR_POLICY, "{r:?}"),
            other => panic!("bad token not refused (info={info}): {other:?}"),
        }
        // Still in the option phase: a good token works on the same connection.
        let good = token::token(&token::image_id("after-refusal"), 1 << 20);
        assert!(
            c.go(&good).is_ok(),
            "connection unusable after a refused token"
        );
    }
    let mut c = s.handshake();
    let r = c.export_name(tok);
    assert!(
        r.is_err() || c.closed_within(CLOSE),
        "EXPORT_NAME with a bad token served: {r:?}"
    );
    s.assert_running();
    s.assert_serves();
    let sig = tok.rsplit('.').next().unwrap_or_default();
    let log = s.log();
    let echoed = (tok.len() > 8 && log.contains(tok)) || (sig.len() > 8 && log.contains(sig));
    assert!(!echoed, "the log echoes a refused token\n{}", s.log_tail());
}

#[test]
fn wrong_signature_is_refused() {
    let mut s = Server::start();
    assert_refused(
        &mut s,
        &token::bad_signature(&token::claims(&token::image_id("sig"), SIZE)),
    );
    let other_secret = token::sign_unchecked(&token::claims(&token::image_id("sig"), SIZE), "x");
    assert_refused(&mut s, &other_secret);
}

#[test]
fn expired_token_is_refused() {
    let mut s = Server::start();
    let mut c = token::claims(&token::image_id("expired"), SIZE);
    c.exp = token::now() - 10;
    assert_refused(&mut s, &token::mint(&c));
}

#[test]
fn alg_none_token_is_refused() {
    let mut s = Server::start();
    assert_refused(
        &mut s,
        &token::alg_none(&token::claims(&token::image_id("none"), SIZE)),
    );
}

#[test]
fn bad_image_ids_are_refused_even_when_signed() {
    let mut s = Server::start();
    for id in [
        "../x",
        "../x.mvps-image",
        "a/b.mvps-image",
        "x",
        ".mvps-image",
        "x.mvps-image/",
    ] {
        assert_refused(
            &mut s,
            &token::sign_unchecked(&token::claims(id, SIZE), token::SECRET),
        );
    }
    let long = format!("{}.mvps-image", "a".repeat(65));
    assert_refused(
        &mut s,
        &token::sign_unchecked(&token::claims(&long, SIZE), token::SECRET),
    );
    // Nothing was created outside (or inside) the image store for them.
    assert!(!s.data_dir().join("x").exists() && !s.dir().join("x").exists());
}

#[test]
fn bad_claims_are_refused_even_when_signed() {
    let mut s = Server::start();
    let id = token::image_id("claims");
    let mut bad = Vec::new();
    let mut c = token::claims(&id, SIZE);
    c.page_size_bits = 17;
    bad.push(c);
    let mut c = token::claims(&id, SIZE);
    c.page_size_bits = 8;
    bad.push(c);
    bad.push(token::claims(&id, 4097));
    bad.push(token::claims(&id, 0));
    for c in bad {
        assert_refused(&mut s, &token::sign_unchecked(&c, token::SECRET));
    }
    assert_refused(&mut s, "not-a-jwt");
    assert_refused(&mut s, "");
    assert_refused(&mut s, &"a".repeat(5000));
}

#[test]
fn export_name_with_a_good_token_serves() {
    let s = Server::start();
    let tok = token::token(&token::image_id("export-name"), SIZE);
    let mut c = s.handshake();
    let (size, flags) = c.export_name(&tok).expect("EXPORT_NAME");
    assert_eq!(size, SIZE);
    assert!(flags & nbd::TFLAG_HAS_FLAGS != 0 && flags & nbd::TFLAG_SEND_FLUSH != 0);
    c.write(1, b"abc").unwrap();
    assert_eq!(c.read(0, 5), Ok(b"\0abc\0".to_vec()));
}

#[test]
fn out_of_range_requests_get_einval_or_enospc_and_the_connection_stays_usable() {
    let s = Server::start();
    let mut c = s.open(&token::token(&token::image_id("range"), SIZE));
    c.write(SIZE - 4, b"last").unwrap();
    assert_eq!(
        c.read(SIZE - 100, 200),
        Err(nbd::EINVAL),
        "read straddling the end"
    );
    assert_eq!(c.read(SIZE, 1), Err(nbd::EINVAL), "read at the end");
    assert_eq!(
        c.read(SIZE + 4096, 4096),
        Err(nbd::EINVAL),
        "read past the end"
    );
    assert_eq!(
        c.read(u64::MAX - 10, 4096),
        Err(nbd::EINVAL),
        "offset + length overflows"
    );
    assert_eq!(
        c.write(SIZE - 2, b"four"),
        Err(nbd::ENOSPC),
        "write straddling the end"
    );
    assert_eq!(c.write(SIZE, b"x"), Err(nbd::ENOSPC), "write at the end");
    assert_eq!(
        c.write(u64::MAX - 1, b"xyz"),
        Err(nbd::ENOSPC),
        "offset + length overflows"
    );
    let trim = c.trim(SIZE - 4096, 8192);
    assert!(
        matches!(trim, Err(nbd::EINVAL | nbd::ENOSPC)),
        "trim past the end: {trim:?}"
    );
    let zero = c.write_zeroes(SIZE, 4096, 0);
    assert!(
        matches!(zero, Err(nbd::EINVAL | nbd::ENOSPC)),
        "zeroes past the end: {zero:?}"
    );
    // Nothing was partially applied, and the connection still works.
    assert_eq!(c.read(SIZE - 4, 4), Ok(b"last".to_vec()));
    assert_eq!(c.read(SIZE - 1, 1), Ok(b"t".to_vec()));
    c.disconnect();
    s.assert_serves();
}

#[test]
fn unknown_commands_get_einval_and_the_connection_stays_usable() {
    let s = Server::start();
    let mut c = s.open(&token::token(&token::image_id("unknown-cmd"), SIZE));
    for cmd in [99u16, 7, 63, 68, 0xffff] {
        assert_eq!(c.command(cmd), Err(nbd::EINVAL), "command {cmd}");
    }
    assert_eq!(c.read(0, 3), Ok(vec![0; 3]));
    c.disconnect();
    s.assert_serves();
}

#[test]
fn oversized_reads_are_refused_but_the_maximum_works() {
    let s = Server::start();
    let mut c = s.open(&token::token(&token::image_id("oversized"), SIZE));
    for len in [(32 << 20) + 1, 64 << 20, u32::MAX] {
        let r = c.read(0, len);
        assert!(
            matches!(r, Err(nbd::EOVERFLOW | nbd::EINVAL)),
            "read of {len} bytes: {r:?}"
        );
    }
    let max = pattern(30, 32 << 20);
    c.write(0, &max).unwrap();
    assert!(c.read(0, 32 << 20) == Ok(max), "a 32 MiB read must work");
    c.disconnect();
    s.assert_serves();
}

#[test]
fn garbage_instead_of_a_handshake_closes_only_that_connection() {
    let mut s = Server::start();
    // Bytes before reading the greeting.
    let mut raw = Client::new(s.connect().unwrap());
    raw.s
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(
        raw.closed_within(CLOSE),
        "server kept a connection that sent HTTP"
    );
    // Client flags without FIXED_NEWSTYLE, then an option.
    let mut c = Client::new(s.connect().unwrap());
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut c.s, &mut greeting).unwrap();
    c.s.write_all(&[0xff, 0xff, 0xff, 0xfc]).unwrap();
    assert!(
        c.closed_within(CLOSE),
        "server accepted unknown client flags"
    );
    // Bad option magic.
    let mut c = s.handshake();
    c.s.write_all(&[0x55; 16]).unwrap();
    assert!(
        c.closed_within(CLOSE),
        "server kept a connection with bad option magic"
    );
    // An oversized option (1 MiB, sent in full): refused with an error reply, and the
    // handshake goes on.
    let mut c = s.handshake();
    c.send_option(nbd::OPT_GO, &vec![0x41; 1 << 20]).unwrap();
    let r = c
        .read_option_reply()
        .expect("a reply to an oversized option");
    assert!(r.typ & (1 << 31) != 0, "a 1 MiB option was accepted: {r:?}");
    let tok = token::token(&token::image_id("after-big-option"), 1 << 20);
    assert!(
        c.go(&tok).is_ok(),
        "handshake unusable after an oversized option"
    );
    s.assert_running();
    s.assert_serves();
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let s = Server::start();
    let mut c = s.open(&token::token(&token::image_id("magic"), SIZE));
    c.write(0, b"kept").unwrap();
    let mut req = [0u8; 28];
    req[..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    c.s.write_all(&req).unwrap();
    assert!(
        c.closed_within(CLOSE),
        "server kept a connection with bad request magic"
    );
    s.assert_serves();
    let mut c = s.open(&token::token(&token::image_id("magic"), SIZE));
    assert!(
        c.read(0, 4).is_ok(),
        "image unusable after a bad-magic connection"
    );
}

#[test]
fn a_stalled_handshake_does_not_block_other_clients() {
    let s = Server::start();
    let _silent = s.connect().unwrap(); // never reads nor writes
    let _half = {
        let mut c = s.handshake();
        c.s.write_all(&nbd::IHAVEOPT.to_be_bytes()).unwrap(); // half an option header
        c
    };
    s.assert_serves();
}

#[test]
fn clients_that_abandon_requests_do_not_hurt_the_server() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("abandon"), SIZE);
    // Many reads in flight, then hang up without reading a reply.
    let mut c = s.open(&tok);
    for i in 0..64 {
        c.send_request(0, nbd::CMD_READ, i * 65536, 65536, &[])
            .unwrap();
    }
    drop(c);
    // A write header with only half of its payload.
    let mut c = s.open(&tok);
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&nbd::REQUEST_MAGIC.to_be_bytes());
    hdr.extend_from_slice(&[0, 0, 0, 1]); // flags 0, WRITE
    hdr.extend_from_slice(&7u64.to_be_bytes());
    hdr.extend_from_slice(&0u64.to_be_bytes());
    hdr.extend_from_slice(&65536u32.to_be_bytes());
    hdr.extend_from_slice(&[0xaa; 30_000]);
    c.s.write_all(&hdr).unwrap();
    drop(c);
    // Writes in flight, then a hang-up: each write is either wholly there or not at all.
    let mut c = s.open(&tok);
    for i in 0..32u64 {
        c.send_request(
            0,
            nbd::CMD_WRITE,
            (1 << 20) + i * 8192,
            8192,
            &[i as u8 + 1; 8192],
        )
        .unwrap();
    }
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    s.assert_running();
    s.assert_serves();
    let mut c = s.open(&tok);
    assert_eq!(
        c.read(0, 65536),
        Ok(vec![0; 65536]),
        "half a write payload was applied"
    );
    for i in 0..32u64 {
        let got = c.read((1 << 20) + i * 8192, 8192).unwrap();
        let whole = got.iter().all(|&b| b == 0) || got.iter().all(|&b| b == i as u8 + 1);
        assert!(whole, "abandoned write {i} is torn");
    }
}
