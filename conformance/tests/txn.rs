//! The transactional extension (DESIGN §6, seed README): BEGIN/COMMIT/ROLLBACK/LOCK (64..=67).
//! Writes inside a transaction are visible to their own connection only, until COMMIT makes
//! them visible everywhere at once; ROLLBACK and a dropped connection discard them; commands
//! out of order get EINVAL and the connection stays usable; LOCK fails with EPERM after a
//! concurrent commit, which makes BEGIN/read/LOCK/write/COMMIT a serializable
//! read-modify-write; a replied COMMIT survives SIGKILL and an uncommitted transaction never
//! shows. Also client_id fencing: a new connection with the same client_id replaces the old
//! one and rolls its transaction back.

use mvps_conformance::nbd::{self, Client};
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;
use std::time::Duration;

const SIZE: u64 = 64 << 20;

fn begin(c: &mut Client) {
    assert_eq!(c.command(nbd::CMD_MVPS_BEGIN_TXN), Ok(()), "BEGIN");
}
fn commit(c: &mut Client) -> Result<(), u32> {
    c.command(nbd::CMD_MVPS_COMMIT_TXN)
}
fn rollback(c: &mut Client) -> Result<(), u32> {
    c.command(nbd::CMD_MVPS_ROLLBACK_TXN)
}
fn lock(c: &mut Client) -> Result<(), u32> {
    c.command(nbd::CMD_MVPS_LOCK_TXN)
}

#[test]
fn commit_publishes_all_writes_at_once_with_read_your_writes_before() {
    let s = Server::start();
    let tok = token::token(&token::image_id("txn-commit"), SIZE);
    let (mut a, mut b) = (s.open(&tok), s.open(&tok));
    a.write(0, &[0x11; 8192]).unwrap();
    begin(&mut a);
    let big = pattern(60, 100_000);
    a.write(1000, &big).unwrap(); // partial pages, over committed data
    a.write(5 << 20, b"second").unwrap();
    a.trim(200_000, 4096).unwrap();
    // Read-your-writes on A, nothing on B.
    let mut mine = vec![0x11u8; 8192];
    mine.resize(101_000, 0);
    mine[1000..].copy_from_slice(&big);
    assert!(
        a.read(0, 101_000) == Ok(mine.clone()),
        "A does not see its own writes"
    );
    assert_eq!(a.read(5 << 20, 6), Ok(b"second".to_vec()));
    assert_eq!(
        b.read(0, 8192),
        Ok(vec![0x11; 8192]),
        "B sees uncommitted writes"
    );
    assert_eq!(
        b.read(5 << 20, 6),
        Ok(vec![0; 6]),
        "B sees uncommitted writes"
    );
    assert_eq!(commit(&mut a), Ok(()));
    assert!(b.read(0, 101_000) == Ok(mine), "B does not see the commit");
    assert_eq!(b.read(5 << 20, 6), Ok(b"second".to_vec()));
}

#[test]
fn rollback_and_disconnect_discard_the_transaction() {
    let s = Server::start();
    let tok = token::token(&token::image_id("txn-rollback"), SIZE);
    let mut a = s.open(&tok);
    a.write(0, b"committed").unwrap();
    begin(&mut a);
    a.write(0, b"discarded").unwrap();
    assert_eq!(rollback(&mut a), Ok(()));
    assert_eq!(
        a.read(0, 9),
        Ok(b"committed".to_vec()),
        "ROLLBACK kept the write"
    );
    // A connection that drops mid-transaction rolls back.
    let mut d = s.open(&tok);
    begin(&mut d);
    d.write(0, b"dropped!!").unwrap();
    drop(d);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        s.open(&tok).read(0, 9),
        Ok(b"committed".to_vec()),
        "dropped txn applied"
    );
}

#[test]
fn commands_out_of_order_get_einval_and_the_connection_stays_usable() {
    let s = Server::start();
    let mut c = s.open(&token::token(&token::image_id("txn-order"), SIZE));
    assert_eq!(commit(&mut c), Err(nbd::EINVAL), "COMMIT without BEGIN");
    assert_eq!(rollback(&mut c), Err(nbd::EINVAL), "ROLLBACK without BEGIN");
    assert_eq!(lock(&mut c), Err(nbd::EINVAL), "LOCK without BEGIN");
    begin(&mut c);
    assert_eq!(
        c.command(nbd::CMD_MVPS_BEGIN_TXN),
        Err(nbd::EINVAL),
        "BEGIN twice"
    );
    c.write(3, b"still open").unwrap();
    assert_eq!(
        commit(&mut c),
        Ok(()),
        "the first transaction survives a second BEGIN"
    );
    assert_eq!(c.read(3, 10), Ok(b"still open".to_vec()));
}

#[test]
fn lock_fails_with_eperm_after_a_concurrent_commit() {
    let s = Server::start();
    let tok = token::token(&token::image_id("txn-lock"), SIZE);
    let (mut a, mut b) = (s.open(&tok), s.open(&tok));
    begin(&mut a);
    b.write(4096, b"plain write is a transaction too").unwrap();
    assert_eq!(
        lock(&mut a),
        Err(nbd::EPERM),
        "LOCK after another commit since BEGIN"
    );
    assert_eq!(rollback(&mut a), Ok(()));
    // Nothing happened since BEGIN: LOCK succeeds and COMMIT applies.
    begin(&mut a);
    assert_eq!(lock(&mut a), Ok(()));
    a.write(0, b"locked").unwrap();
    assert_eq!(commit(&mut a), Ok(()));
    assert_eq!(b.read(0, 6), Ok(b"locked".to_vec()));
}

#[test]
fn optimistic_increments_from_two_connections_are_serializable() {
    let s = Server::start();
    let tok = token::token(&token::image_id("txn-counter"), SIZE);
    const PER_CLIENT: u64 = 40;
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let mut c = s.open(&tok);
            std::thread::spawn(move || {
                let mut conflicts = 0;
                let mut done = 0;
                while done < PER_CLIENT {
                    begin(&mut c);
                    let v = u64::from_le_bytes(c.read(4090, 8).unwrap().try_into().unwrap());
                    match lock(&mut c) {
                        Ok(()) => {
                            c.write(4090, &(v + 1).to_le_bytes()).unwrap(); // spans 2 pages
                            assert_eq!(commit(&mut c), Ok(()));
                            done += 1;
                        }
                        Err(e) => {
                            assert_eq!(e, nbd::EPERM, "LOCK failed with {e}");
                            assert_eq!(rollback(&mut c), Ok(()));
                            conflicts += 1;
                            assert!(conflicts < 10_000, "no progress");
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let v = s.open(&tok).read(4090, 8).unwrap();
    assert_eq!(
        u64::from_le_bytes(v.try_into().unwrap()),
        2 * PER_CLIENT,
        "lost update"
    );
}

#[test]
fn committed_transactions_survive_kill_9_and_open_ones_never_show() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("txn-crash"), SIZE);
    let mut a = s.open(&tok);
    begin(&mut a);
    let data = pattern(61, 300_000);
    a.write(77, &data).unwrap();
    assert_eq!(commit(&mut a), Ok(()));
    let mut b = s.open(&tok);
    begin(&mut b);
    b.write(1 << 20, &[0xab; 50_000]).unwrap();
    b.write(0, &[0xab; 100]).unwrap();
    s.kill9();
    s.restart();
    let mut c = s.open(&tok);
    let mut expect = vec![0u8; 77];
    expect.extend_from_slice(&data);
    assert!(
        c.read(0, expect.len() as u32) == Ok(expect),
        "committed txn lost or mixed"
    );
    assert_eq!(
        c.read(1 << 20, 50_000),
        Ok(vec![0; 50_000]),
        "uncommitted txn visible"
    );
}

#[test]
fn a_new_connection_with_the_same_client_id_replaces_the_old_one() {
    let s = Server::start();
    let mut cl = token::claims(&token::image_id("client-id"), SIZE);
    cl.client_id = Some("vm-42".into());
    let tok = token::mint(&cl);
    let mut old = s.open(&tok);
    old.write(0, b"before").unwrap();
    begin(&mut old);
    old.write(0, b"in-txn").unwrap();
    let mut new = s.open(&tok);
    assert!(
        old.closed_within(Duration::from_secs(10)),
        "old connection not shut down"
    );
    assert_eq!(
        new.read(0, 6),
        Ok(b"before".to_vec()),
        "old transaction not rolled back"
    );
    // A different client id does not fence.
    cl.client_id = Some("vm-43".into());
    let mut other = s.open(&token::mint(&cl));
    assert_eq!(other.read(0, 6), Ok(b"before".to_vec()));
    assert_eq!(
        new.read(0, 6),
        Ok(b"before".to_vec()),
        "different client_id fenced"
    );
}
