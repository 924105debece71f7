//! What the server advertises to a standard client (libnbd's `nbdinfo`) and to a raw one:
//! export size, block-size constraints (minimum 1, preferred = page size, maximum 32 MiB),
//! transmission flags as named bits, and that export listing is refused because export
//! names are secrets (DESIGN §6). Guards against a server that stops advertising a flag the
//! clients rely on (multi-conn, FUA, ...) or that leaks tokens through `NBD_OPT_LIST`.

use mvps_conformance::nbd::{self, OptError};
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, run};
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn nbdinfo_json(server: &Server, tok: &str) -> Value {
    let out = run(&mut cmd("nbdinfo", ["--json", &server.uri(tok)]), T).ok();
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["exports"][0].clone()
}

fn assert_advertised(e: &Value, size: u64, preferred: u64) {
    assert_eq!(e["export-size"], size, "{e:#}");
    assert_eq!(e["block_size_minimum"], 1, "{e:#}");
    assert_eq!(e["block_size_preferred"], preferred, "{e:#}");
    assert_eq!(e["block_size_maximum"], 33_554_432, "{e:#}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e:#}");
    }
    assert_eq!(e["is_read_only"], false, "{e:#}");
}

#[test]
fn nbdinfo_sees_size_block_sizes_and_flags_over_tcp() {
    let s = Server::start();
    let tok = token::token(&token::image_id("info"), 3 << 30);
    assert_advertised(&nbdinfo_json(&s, &tok), 3 << 30, 4096);
}

#[test]
fn nbdinfo_sees_the_same_over_a_unix_socket() {
    let s = Server::builder().unix().start();
    let tok = token::token(&token::image_id("info-unix"), 64 << 20);
    assert_advertised(&nbdinfo_json(&s, &tok), 64 << 20, 4096);
}

#[test]
fn preferred_block_size_is_the_page_size_of_the_token() {
    let s = Server::start();
    for bits in [9u32, 16] {
        let mut c = token::claims(&token::image_id("pagesize"), 16 << 20);
        c.page_size_bits = bits;
        assert_advertised(&nbdinfo_json(&s, &token::mint(&c)), 16 << 20, 1 << bits);
    }
}

#[test]
fn nbdinfo_list_is_refused_and_prints_no_export() {
    let s = Server::start();
    let out = run(&mut cmd("nbdinfo", ["--list", &s.uri("")]), T).fails();
    assert!(!out.stdout.contains("export-name"), "{out}");
    s.assert_serves();
}

#[test]
fn raw_go_reports_flags_as_named_bits_and_block_sizes() {
    let s = Server::start();
    let tok = token::token(&token::image_id("raw-go"), 1 << 30);
    let mut c = s.handshake();
    let e = c.go(&tok).expect("GO");
    assert_eq!(e.size, 1 << 30);
    for (name, bit) in [
        ("HAS_FLAGS", nbd::TFLAG_HAS_FLAGS),
        ("SEND_FLUSH", nbd::TFLAG_SEND_FLUSH),
        ("SEND_FUA", nbd::TFLAG_SEND_FUA),
        ("SEND_TRIM", nbd::TFLAG_SEND_TRIM),
        ("SEND_WRITE_ZEROES", nbd::TFLAG_SEND_WRITE_ZEROES),
        ("CAN_MULTI_CONN", nbd::TFLAG_CAN_MULTI_CONN),
    ] {
        assert!(
            e.flags & bit != 0,
            "{name} not advertised: flags {:#06x}",
            e.flags
        );
    }
    assert_eq!(
        e.flags & nbd::TFLAG_READ_ONLY,
        0,
        "READ_ONLY advertised: {:#06x}",
        e.flags
    );
    assert_eq!(e.block_size, Some((1, 4096, 1 << 25)));
    c.disconnect();
}

#[test]
fn raw_info_then_go_on_the_same_connection() {
    let s = Server::start();
    let tok = token::token(&token::image_id("raw-info"), 1 << 20);
    let mut c = s.handshake();
    let info = c.info(&tok).expect("INFO");
    assert_eq!(info.size, 1 << 20);
    assert_eq!(info.block_size, Some((1, 4096, 1 << 25)));
    // INFO leaves the connection in the option phase: GO still works.
    let go = c.go(&tok).expect("GO after INFO");
    assert_eq!((go.size, go.flags), (info.size, info.flags));
    assert_eq!(c.read(0, 512), Ok(vec![0; 512]));
}

#[test]
fn raw_list_gets_err_policy_and_the_handshake_continues() {
    let s = Server::start();
    let mut c = s.handshake();
    let replies = c.list().expect("LIST replies");
    assert_eq!(
        replies.len(),
        1,
        "LIST must not name any export: {replies:?}"
    );
    assert_eq!(replies[0].typ, nbd::REP_ERR_POLICY, "{replies:?}");
    assert_eq!(replies[0].opt, nbd::OPT_LIST);
    let tok = token::token(&token::image_id("after-list"), 1 << 20);
    assert_eq!(c.go(&tok).expect("GO after LIST").size, 1 << 20);
}

#[test]
fn unknown_option_gets_err_unsup_and_the_handshake_continues() {
    let s = Server::start();
    let mut c = s.handshake();
    c.send_option(0x7abc, b"whatever").unwrap();
    let r = c.read_option_reply().unwrap();
    assert_eq!((r.opt, r.typ), (0x7abc, nbd::REP_ERR_UNSUP), "{r:?}");
    let tok = token::token(&token::image_id("after-unknown"), 1 << 20);
    match c.go(&tok) {
        Ok(e) => assert_eq!(e.size, 1 << 20),
        Err(OptError::Refused(r)) => panic!("GO refused after unknown option: {r:?}"),
        Err(OptError::Io(e)) => panic!("connection broken after unknown option: {e}"),
    }
}
