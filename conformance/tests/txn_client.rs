//! The transactional extension (DESIGN §6, docs/PROTOCOL.md) against a real `mvps-te`,
//! driven through `mvps::client` (and the raw client where exact bytes matter):
//!
//! - isolation and read-your-writes; ROLLBACK discards; misuse is `EINVAL` and the connection
//!   stays usable;
//! - LOCK fails with `EPERM` once anything committed since BEGIN; four connections running
//!   optimistic increments of one counter lose no update;
//! - COMMIT is atomic across `kill -9` landing at several moments after it was sent (every
//!   page of an 8 MiB transaction old, or every page new);
//! - a dropped connection rolls its transaction back and releases the image lock;
//! - `client_id` fencing: a second connection with the same `client_id` shuts the first down
//!   and rolls its transaction back;
//! - the lock timeout (`--txn-lock-timeout-ms`) and the size cap (`--txn-bytes-max`);
//! - `mvpsctl txn` end to end (expectation met, mismatch → exit 3, conflict → exit 4).
//!
//! The key tests run on both image stores: local (the default) and S3 (SeaweedFS via
//! `mvps::s3::testing`, a fresh bucket per test). Guards transactions that leak into other
//! connections, half-applied commits, lost updates, and locks that outlive their holder.

use mvps::client::{self, sha256, Client};
use mvps::nbd::consts::{NBD_EINVAL, NBD_ENOSPC, NBD_ESHUTDOWN};
use mvps::s3::testing::{self, SeaweedFs};
use mvps_conformance::bins;
use mvps_conformance::nbd;
use mvps_conformance::server::{Builder, Listen, Server};
use mvps_conformance::token;
use mvps_conformance::tools::{heavy, pattern, run, wait_for, wait_timeout, Output};
use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;
/// Socket timeout of every test connection: no request may hang a test.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------ harness

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Local,
    S3,
}

/// A server on one of the two image stores. Field order matters: the server is killed
/// before the shared SeaweedFS handle is released.
struct Srv {
    server: Server,
    _weed: Option<Arc<SeaweedFs>>,
}

impl Deref for Srv {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

impl DerefMut for Srv {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.server
    }
}

fn builder(store: Store, args: &[&str]) -> (Builder, Option<Arc<SeaweedFs>>) {
    let mut b = Server::builder().args(args.iter().copied());
    if store == Store::Local {
        return (b, None);
    }
    let weed = testing::shared();
    let bucket = weed.fresh_bucket();
    b = b.args([
        "--image-store",
        "s3",
        "--image-store-s3-bucket",
        &bucket,
        "--image-store-s3-prefix",
        "txn/",
    ]);
    for (k, v) in weed.env() {
        b = b.env(k, &v);
    }
    (b, Some(weed))
}

#[track_caller]
fn start(store: Store, args: &[&str]) -> Srv {
    let (b, weed) = builder(store, args);
    Srv {
        server: b.start(),
        _weed: weed,
    }
}

/// `HOST:PORT` or `unix:/path`, as `mvps::client` and `mvpsctl` take it.
fn addr(s: &Server) -> String {
    match &s.listen {
        Listen::Tcp(p) => format!("127.0.0.1:{p}"),
        Listen::Unix(p) => format!("unix:{}", p.display()),
    }
}

#[track_caller]
fn connect(s: &Server, tok: &str) -> Client {
    let mut c = Client::connect(&addr(s), tok)
        .unwrap_or_else(|e| panic!("connecting: {e}\n{}", s.log_tail()));
    c.set_timeout(Some(IO_TIMEOUT)).unwrap();
    c
}

fn image(tag: &str, size: u64) -> String {
    token::token(&token::image_id(tag), size)
}

#[track_caller]
fn assert_errno<T: std::fmt::Debug>(r: client::Result<T>, errno: u32, what: &str) {
    match r {
        Err(client::Error::Nbd { errno: got, .. }) if got == errno => {}
        other => panic!("{what}: want error {errno}, got {other:?}"),
    }
}

#[track_caller]
fn assert_conflict<T: std::fmt::Debug>(r: client::Result<T>, what: &str) {
    match r {
        Err(e) if e.is_conflict() => {}
        other => panic!("{what}: want a conflict (EPERM), got {other:?}"),
    }
}

#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len());
        panic!("{what}: {} bytes differ from byte {at} on", got.len());
    }
}

// ---------------------------------------------------------------- isolation, rollback

fn isolation_and_read_your_writes(store: Store) {
    let s = start(store, &[]);
    let tok = image("txn-iso", 16 * MIB);
    let (mut a, mut b) = (connect(&s, &tok), connect(&s, &tok));
    let base = pattern(1, 64 * 1024);
    a.write(0, &base).unwrap();
    let mut want = base.clone();

    a.begin().unwrap();
    let x = pattern(2, 10_000);
    a.write(1000, &x).unwrap(); // unaligned, spans three pages
    want[1000..11_000].copy_from_slice(&x);
    a.write_zeroes(20_000, 5000).unwrap();
    want[20_000..25_000].fill(0);
    a.trim(40_960, 8192).unwrap();
    want[40_960..49_152].fill(0);
    let y = pattern(3, 300);
    a.write(10_900, &y).unwrap(); // over its own earlier write
    want[10_900..11_200].copy_from_slice(&y);

    assert_same(
        &a.read(0, want.len()).unwrap(),
        &want,
        "A inside its transaction",
    );
    assert_same(
        &a.read(10_950, 7).unwrap(),
        &want[10_950..10_957],
        "A, a short read",
    );
    assert_same(
        &b.read(0, base.len()).unwrap(),
        &base,
        "B while A's transaction is open",
    );
    b.begin().unwrap();
    assert_same(
        &b.read(0, base.len()).unwrap(),
        &base,
        "B inside its own transaction",
    );
    b.rollback().unwrap();

    a.commit().unwrap();
    assert_same(&b.read(0, want.len()).unwrap(), &want, "B after A's COMMIT");
    assert_same(&a.read(0, want.len()).unwrap(), &want, "A after its COMMIT");
    let mut c = connect(&s, &tok);
    assert_same(
        &c.read(0, want.len()).unwrap(),
        &want,
        "a new connection after COMMIT",
    );
}

#[test]
fn isolation_and_read_your_writes_local() {
    isolation_and_read_your_writes(Store::Local);
}

#[test]
fn isolation_and_read_your_writes_s3() {
    isolation_and_read_your_writes(Store::S3);
}

fn rollback_discards(store: Store) {
    let s = start(store, &[]);
    let tok = image("txn-rollback", 16 * MIB);
    let (mut a, mut b) = (connect(&s, &tok), connect(&s, &tok));
    let base = pattern(4, 3 * PAGE + 50);
    a.write(PAGE as u64 - 25, &base).unwrap();
    let all = |c: &mut Client| c.read(0, 5 * PAGE).unwrap();
    let before = all(&mut a);

    a.begin().unwrap();
    a.write(100, &pattern(5, 2 * PAGE)).unwrap();
    a.write_zeroes(3 * PAGE as u64, PAGE as u64).unwrap();
    assert_ne!(all(&mut a), before, "A does not see its own writes");
    a.rollback().unwrap();
    assert_same(&all(&mut a), &before, "A after ROLLBACK");
    assert_same(&all(&mut b), &before, "B after A's ROLLBACK");

    // The connection starts a new transaction normally; an empty one commits.
    a.begin().unwrap();
    a.commit().unwrap();
    a.begin().unwrap();
    a.write(0, &[9; 10]).unwrap();
    a.commit().unwrap();
    let mut want = before.clone();
    want[..10].fill(9);
    assert_same(&all(&mut b), &want, "B after a later COMMIT");
}

#[test]
fn rollback_discards_local() {
    rollback_discards(Store::Local);
}

#[test]
fn rollback_discards_s3() {
    rollback_discards(Store::S3);
}

fn misuse_is_einval_and_the_connection_stays_usable(store: Store) {
    let s = start(store, &[]);
    let tok = image("txn-misuse", 4 * MIB);
    let (mut a, mut b) = (connect(&s, &tok), connect(&s, &tok));
    assert_errno(a.commit(), NBD_EINVAL, "COMMIT without a transaction");
    assert_errno(a.rollback(), NBD_EINVAL, "ROLLBACK without a transaction");
    assert_errno(a.lock(), NBD_EINVAL, "LOCK without a transaction");
    assert!(
        !a.commit().unwrap_err().is_conflict(),
        "EINVAL is not a conflict"
    );
    a.write(0, b"plain").unwrap();
    assert_eq!(a.read(0, 5).unwrap(), b"plain");

    a.begin().unwrap();
    a.write(0, b"first").unwrap();
    assert_errno(a.begin(), NBD_EINVAL, "BEGIN inside a transaction");
    // The first transaction is still open and still private.
    assert_eq!(a.read(0, 5).unwrap(), b"first");
    assert_eq!(b.read(0, 5).unwrap(), b"plain");
    a.lock().unwrap();
    a.lock().unwrap(); // a second LOCK by the holder succeeds
    a.commit().unwrap();
    assert_eq!(b.read(0, 5).unwrap(), b"first");
    assert_errno(a.commit(), NBD_EINVAL, "a second COMMIT");

    // Flags the commands do not take: EINVAL, nothing else happens.
    let mut raw = s.open(&tok);
    let fua = nbd::CMD_FLAG_FUA;
    assert_eq!(
        raw.request(fua, nbd::CMD_MVPS_BEGIN_TXN, 0, 0, &[]),
        Err(nbd::EINVAL)
    );
    assert_eq!(
        raw.request(fua, nbd::CMD_MVPS_LOCK_TXN, 0, 0, &[]),
        Err(nbd::EINVAL)
    );
    assert_eq!(raw.command(nbd::CMD_MVPS_ROLLBACK_TXN), Err(nbd::EINVAL));
    assert_eq!(raw.command(nbd::CMD_MVPS_BEGIN_TXN), Ok(()));
    assert_eq!(raw.write(0, b"raw"), Ok(()));
    assert_eq!(
        raw.request(fua, nbd::CMD_MVPS_COMMIT_TXN, 0, 0, &[]),
        Ok(vec![])
    );
    assert_eq!(b.read(0, 5).unwrap(), b"rawst");
    raw.disconnect();
}

#[test]
fn misuse_is_einval_and_the_connection_stays_usable_local() {
    misuse_is_einval_and_the_connection_stays_usable(Store::Local);
}

#[test]
fn misuse_is_einval_and_the_connection_stays_usable_s3() {
    misuse_is_einval_and_the_connection_stays_usable(Store::S3);
}

// ---------------------------------------------------------------------- LOCK and OCC

fn lock_conflicts(store: Store) {
    let s = start(store, &[]);
    let tok = image("txn-lock", 4 * MIB);
    let (mut a, mut b) = (connect(&s, &tok), connect(&s, &tok));

    // Each kind of plain change by another connection makes LOCK fail.
    type Change = fn(&mut Client);
    let changes: [(&str, Change); 3] = [
        ("WRITE", |c| c.write(8192, b"x").unwrap()),
        ("TRIM", |c| c.trim(0, 4096).unwrap()),
        ("WRITE_ZEROES", |c| c.write_zeroes(100, 10).unwrap()),
    ];
    for (what, change) in changes {
        a.begin().unwrap();
        let _ = a.read(0, 16).unwrap();
        change(&mut b);
        assert_conflict(a.lock(), &format!("LOCK after another connection's {what}"));
        // The transaction is still open after the failed LOCK.
        assert_errno(a.begin(), NBD_EINVAL, "BEGIN after a failed LOCK");
        a.rollback().unwrap();
    }

    // A committed transaction of another connection conflicts too.
    a.begin().unwrap();
    b.begin().unwrap();
    b.write(0, b"b").unwrap();
    b.commit().unwrap();
    assert_conflict(a.lock(), "LOCK after another connection's COMMIT");
    a.rollback().unwrap();

    // Rolled-back and read-only transactions change nothing: LOCK succeeds.
    a.begin().unwrap();
    b.begin().unwrap();
    b.write(0, b"never").unwrap();
    b.rollback().unwrap();
    b.begin().unwrap();
    let _ = b.read(0, 5).unwrap();
    b.commit().unwrap();
    a.lock().unwrap();
    a.write(0, b"a").unwrap();
    a.commit().unwrap();
    assert_eq!(b.read(0, 1).unwrap(), b"a");

    // Own plain writes before BEGIN do not count; own writes inside do not either.
    a.write(1, b"z").unwrap();
    a.begin().unwrap();
    a.write(2, b"y").unwrap();
    a.lock().unwrap();
    a.commit().unwrap();
    assert_eq!(b.read(0, 3).unwrap(), b"azy");
}

#[test]
fn lock_conflicts_local() {
    lock_conflicts(Store::Local);
}

#[test]
fn lock_conflicts_s3() {
    lock_conflicts(Store::S3);
}

const COUNTER_CONNECTIONS: usize = 4;
const COUNTER_INCREMENTS: u64 = 25;
/// Attempts one connection may make before the test calls it livelock.
const COUNTER_ATTEMPTS_MAX: u64 = 5000;
const COUNTER_DEADLINE: Duration = Duration::from_secs(120);

/// One connection's optimistic increments: BEGIN, read, LOCK, write +1, COMMIT; on a
/// conflict roll back and retry. Returns the number of conflicts.
fn increment(addr: String, tok: String, deadline: Instant) -> u64 {
    let mut c = Client::connect(&addr, &tok).expect("connecting");
    c.set_timeout(Some(IO_TIMEOUT)).unwrap();
    let (mut done, mut conflicts) = (0, 0);
    for _ in 0..COUNTER_ATTEMPTS_MAX {
        if done == COUNTER_INCREMENTS {
            return conflicts;
        }
        assert!(Instant::now() < deadline, "counter test past its deadline");
        c.begin().unwrap();
        let v = u64::from_le_bytes(c.read(0, 8).unwrap().try_into().unwrap());
        match c.lock() {
            Ok(()) => {}
            Err(e) if e.is_conflict() => {
                conflicts += 1;
                c.rollback().unwrap();
                continue;
            }
            Err(e) => panic!("LOCK: {e}"),
        }
        c.write(0, &(v + 1).to_le_bytes()).unwrap();
        match c.commit() {
            Ok(()) => done += 1,
            Err(e) if e.is_conflict() => conflicts += 1, // lost the lock; the txn is gone
            Err(e) => panic!("COMMIT: {e}"),
        }
    }
    panic!("{done} increments after {COUNTER_ATTEMPTS_MAX} attempts");
}

fn counter_loses_no_update(store: Store) {
    let s = start(store, &[]);
    let tok = image("txn-counter", MIB);
    let started = Instant::now();
    let deadline = started + COUNTER_DEADLINE;
    let workers: Vec<_> = (0..COUNTER_CONNECTIONS)
        .map(|_| {
            let (a, t) = (addr(&s), tok.clone());
            std::thread::spawn(move || increment(a, t, deadline))
        })
        .collect();
    let conflicts: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let mut c = connect(&s, &tok);
    let v = u64::from_le_bytes(c.read(0, 8).unwrap().try_into().unwrap());
    eprintln!(
        "counter ({store:?}): {v} after {:?}, {conflicts} conflicts retried",
        started.elapsed()
    );
    assert_eq!(
        v,
        COUNTER_CONNECTIONS as u64 * COUNTER_INCREMENTS,
        "lost updates"
    );
}

#[test]
fn counter_loses_no_update_local() {
    counter_loses_no_update(Store::Local);
}

#[test]
fn counter_loses_no_update_s3() {
    counter_loses_no_update(Store::S3);
}

// ---------------------------------------------------------------------- crash: kill -9

/// Where the 8 MiB transaction lands: starting 100 bytes into a page, so both edge pages
/// are partial and read-modify-written inside the transaction.
const CRASH_OFFSET: u64 = MIB + 100;
const CRASH_LEN: usize = 8 << 20;
/// Delays between sending COMMIT and SIGKILL.
const CRASH_DELAYS_MS: [u64; 5] = [0, 1, 5, 20, 100];

/// Which version each image page of the crash region holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Old,
    New,
}

fn page_versions(got: &[u8], old: &[u8], new: &[u8]) -> Result<Vec<Version>, String> {
    let mut out = Vec::new();
    let first_page = CRASH_OFFSET / PAGE as u64;
    let end = CRASH_OFFSET + CRASH_LEN as u64;
    for p in first_page..end.div_ceil(PAGE as u64) {
        let lo = (p * PAGE as u64).max(CRASH_OFFSET) - CRASH_OFFSET;
        let hi = ((p + 1) * PAGE as u64).min(end) - CRASH_OFFSET;
        let r = lo as usize..hi as usize;
        out.push(if got[r.clone()] == old[r.clone()] {
            Version::Old
        } else if got[r.clone()] == new[r] {
            Version::New
        } else {
            return Err(format!("page {p} is neither the old nor the new version"));
        });
    }
    Ok(out)
}

fn kill9_after_commit_is_all_or_nothing(store: Store) {
    let _heavy = heavy();
    // Frequent checkpoints, so committed pages move to the image store while the next
    // transaction is open and the kills land beside checkpoint work too.
    let ckpt = [
        "--checkpoint-interval-ms",
        "300",
        "--checkpoint-interval-jitter-ms",
        "50",
    ];
    let mut s = start(store, &ckpt);
    let tok = image("txn-crash", 64 * MIB);
    // Markers around the region must survive every round untouched.
    let (before, after) = (pattern(90, 100), pattern(91, PAGE * 2));
    let mut old = pattern(100, CRASH_LEN);
    {
        let mut c = connect(&s, &tok);
        c.write(MIB, &before).unwrap();
        c.write(CRASH_OFFSET, &old).unwrap();
        c.write(CRASH_OFFSET + CRASH_LEN as u64, &after).unwrap();
        c.flush().unwrap();
    }
    let mut outcomes = Vec::new();
    for (round, delay_ms) in CRASH_DELAYS_MS.iter().chain(&CRASH_DELAYS_MS).enumerate() {
        let new = pattern(200 + round as u64, CRASH_LEN);
        let fua = round % 2 == 1;
        let mut raw = s.open(&tok);
        assert_eq!(raw.command(nbd::CMD_MVPS_BEGIN_TXN), Ok(()));
        raw.write(CRASH_OFFSET, &new).unwrap();
        let flags = if fua { nbd::CMD_FLAG_FUA } else { 0 };
        raw.send_request(flags, nbd::CMD_MVPS_COMMIT_TXN, 0, 0, &[])
            .unwrap();
        std::thread::sleep(Duration::from_millis(*delay_ms));
        s.kill9();
        raw.s
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let acked = matches!(raw.read_reply(), Ok((_, Ok(_))));
        s.restart();
        let mut c = connect(&s, &tok);
        let got = c.read(CRASH_OFFSET, CRASH_LEN).unwrap();
        let versions = page_versions(&got, &old, &new).unwrap_or_else(|e| {
            panic!(
                "round {round} (kill {delay_ms} ms after COMMIT): {e}\n{}",
                s.log_tail()
            )
        });
        let all_new = versions.iter().all(|v| *v == Version::New);
        let all_old = versions.iter().all(|v| *v == Version::Old);
        let n_new = versions.iter().filter(|v| **v == Version::New).count();
        assert!(
            all_new || all_old,
            "round {round} (kill {delay_ms} ms after COMMIT): torn transaction, {n_new} of {} \
             pages new",
            versions.len()
        );
        assert!(
            !acked || all_new,
            "round {round}: COMMIT was acknowledged but not applied"
        );
        assert_same(
            &c.read(MIB, 100).unwrap(),
            &before,
            "bytes before the region",
        );
        let end = CRASH_OFFSET + CRASH_LEN as u64;
        assert_same(
            &c.read(end, after.len()).unwrap(),
            &after,
            "bytes after the region",
        );
        outcomes.push(format!(
            "{delay_ms}ms{}:{}{}",
            if fua { "+fua" } else { "" },
            if all_new { "new" } else { "old" },
            if acked { "(acked)" } else { "" }
        ));
        if all_new {
            old = new;
        }
    }
    eprintln!("kill -9 after COMMIT ({store:?}): {}", outcomes.join(" "));
}

#[test]
fn kill9_after_commit_is_all_or_nothing_local() {
    kill9_after_commit_is_all_or_nothing(Store::Local);
}

#[test]
fn kill9_after_commit_is_all_or_nothing_s3() {
    kill9_after_commit_is_all_or_nothing(Store::S3);
}

// -------------------------------------------------------------- disconnects and fencing

fn dropped_connection_rolls_back(store: Store) {
    let s = start(store, &[]);
    let tok = image("txn-drop", 4 * MIB);
    let mut b = connect(&s, &tok);
    b.write(0, &[1; PAGE]).unwrap();

    // Hard disconnect while holding the image lock: rolled back, lock released.
    let mut a = connect(&s, &tok);
    a.begin().unwrap();
    a.write(0, &[2; PAGE]).unwrap();
    a.lock().unwrap();
    a.hard_disconnect();
    let t = Instant::now();
    b.write(PAGE as u64, &[3; 10]).unwrap(); // waits only until the server sees the drop
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "plain write waited {waited:?} for a dead lock"
    );
    assert_eq!(
        b.read(0, PAGE).unwrap(),
        vec![1; PAGE],
        "dropped transaction visible"
    );

    // A soft disconnect (NBD_CMD_DISC) with a transaction open rolls back as well.
    let mut a = connect(&s, &tok);
    a.begin().unwrap();
    a.write(0, &[4; PAGE]).unwrap();
    a.disconnect().unwrap();
    assert_eq!(
        b.read(0, PAGE).unwrap(),
        vec![1; PAGE],
        "transaction survived DISC"
    );

    // The lock is free: a new connection's transaction locks and commits at once.
    let mut c = connect(&s, &tok);
    c.begin().unwrap();
    c.lock().unwrap();
    c.write(0, &[5; 4]).unwrap();
    c.commit().unwrap();
    assert_eq!(b.read(0, 4).unwrap(), vec![5; 4]);
    // After a restart nothing of the dropped transactions comes back either.
    drop((b, c));
    let mut s = s;
    s.terminate();
    s.restart();
    let mut b = connect(&s, &tok);
    let mut want = vec![1u8; PAGE];
    want[..4].fill(5);
    assert_eq!(b.read(0, PAGE).unwrap(), want);
}

#[test]
fn dropped_connection_rolls_back_local() {
    dropped_connection_rolls_back(Store::Local);
}

#[test]
fn dropped_connection_rolls_back_s3() {
    dropped_connection_rolls_back(Store::S3);
}

fn token_with_client_id(image_id: &str, client_id: Option<&str>) -> String {
    let mut c = token::claims(image_id, 4 * MIB);
    c.client_id = client_id.map(str::to_string);
    token::mint(&c)
}

/// Whether the old connection is shut down: its next request fails (I/O error, or
/// `ESHUTDOWN` before the close).
fn is_fenced(c: &mut Client) -> Result<(), String> {
    match c.read(0, 16) {
        Err(client::Error::Io(_)) => Ok(()),
        Err(e) if e.errno() == Some(NBD_ESHUTDOWN) => Ok(()),
        other => Err(format!("its READ returned {other:?}")),
    }
}

fn client_id_fencing_replaces_the_old_connection(store: Store) {
    let s = start(store, &[]);
    let id = token::image_id("txn-fence");
    let (mine, other_id) = (
        token_with_client_id(&id, Some("fence-client-1")),
        token_with_client_id(&id, Some("fence-client-2")),
    );
    let mut seed = connect(&s, &token_with_client_id(&id, None));
    seed.write(0, &[1; PAGE]).unwrap();

    let mut old = connect(&s, &mine);
    old.begin().unwrap();
    old.write(0, &[2; PAGE]).unwrap();
    old.lock().unwrap();
    let mut unrelated = connect(&s, &other_id);

    // Same client_id: the server shuts `old` down (and rolls its txn back) first.
    let mut new = connect(&s, &mine);
    new.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let old_state = is_fenced(&mut old);
    let t = Instant::now();
    let new_write = new.write(PAGE as u64, &[3; 8]);
    let waited = t.elapsed();
    let new_read = new.read(0, PAGE);
    assert!(
        old_state.is_ok() && new_write.is_ok() && waited < Duration::from_secs(3),
        "client_id fencing: after a second connection with the same client_id, the first \
         must be shut down and its transaction (holding the image lock) rolled back. \
         Observed: old connection: {old_state:?}; new connection's plain WRITE: {new_write:?} \
         after {waited:?}\n{}",
        s.log_tail()
    );
    assert_eq!(
        new_read.unwrap(),
        vec![1; PAGE],
        "the fenced transaction is visible"
    );
    new.begin().unwrap();
    new.lock().unwrap();
    new.write(0, &[4; 4]).unwrap();
    new.commit().unwrap();
    // Another client_id, and no client_id at all, fence nothing.
    assert_eq!(
        unrelated.read(0, 4).unwrap(),
        vec![4; 4],
        "other client_id was fenced"
    );
    assert_eq!(
        seed.read(0, 4).unwrap(),
        vec![4; 4],
        "connection without client_id fenced"
    );
    let mut third = connect(&s, &other_id);
    assert!(
        is_fenced(&mut unrelated).is_ok(),
        "same client_id fences: fence-client-2"
    );
    assert_eq!(third.read(0, 4).unwrap(), vec![4; 4]);
    assert_eq!(
        new.read(0, 4).unwrap(),
        vec![4; 4],
        "fence-client-1 fenced by another id"
    );
}

#[test]
fn client_id_fencing_replaces_the_old_connection_local() {
    client_id_fencing_replaces_the_old_connection(Store::Local);
}

#[test]
fn client_id_fencing_replaces_the_old_connection_s3() {
    client_id_fencing_replaces_the_old_connection(Store::S3);
}

// -------------------------------------------------------------- lock timeout, size cap

fn lock_timeout_rolls_the_holder_back(store: Store) {
    let s = start(store, &["--txn-lock-timeout-ms", "500"]);
    let tok = image("txn-lock-timeout", 4 * MIB);
    let (mut holder, mut reader) = (connect(&s, &tok), connect(&s, &tok));
    let mut writer = connect(&s, &tok);

    // A holder that commits in time: the plain write waits for the COMMIT, then lands.
    holder.begin().unwrap();
    holder.lock().unwrap();
    holder.write(0, &[1; 16]).unwrap();
    let w = std::thread::spawn(move || {
        let t = Instant::now();
        writer.write(8, &[2; 4]).unwrap();
        (writer, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(150));
    // Reads are not blocked by the lock.
    let t = Instant::now();
    assert_eq!(reader.read(0, 16).unwrap(), vec![0; 16]);
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "a READ waited for the image lock"
    );
    holder.commit().unwrap();
    let (mut writer, waited) = w.join().unwrap();
    assert!(
        waited >= Duration::from_millis(100),
        "plain write did not wait: {waited:?}"
    );
    let mut want = vec![1u8; 16];
    want[8..12].fill(2);
    assert_eq!(
        reader.read(0, 16).unwrap(),
        want,
        "the waiting write did not land last"
    );

    // A holder that stalls past the timeout: the waiting write proceeds after ~0.5 s, the
    // holder's transaction is rolled back and its COMMIT fails with EPERM.
    holder.begin().unwrap();
    holder.lock().unwrap();
    holder.write(0, &[7; 16]).unwrap();
    let t = Instant::now();
    writer.write(0, &[8; 2]).unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
        "a plain write behind a stalled lock holder took {waited:?} (timeout 500 ms)"
    );
    assert_conflict(
        holder.commit(),
        "COMMIT after losing the lock to the timeout",
    );
    holder.begin().unwrap(); // the transaction is gone
    holder.rollback().unwrap();
    want[..2].fill(8);
    assert_eq!(
        reader.read(0, 16).unwrap(),
        want,
        "the timed-out transaction was applied"
    );
    eprintln!("lock timeout 500 ms: the blocked write waited {waited:?}");
}

#[test]
fn lock_timeout_rolls_the_holder_back_local() {
    lock_timeout_rolls_the_holder_back(Store::Local);
}

#[test]
fn lock_timeout_rolls_the_holder_back_s3() {
    lock_timeout_rolls_the_holder_back(Store::S3);
}

/// A transaction that lost the image lock to the timeout no longer holds it: a LOCK must
/// not claim otherwise (the client would go on believing its read-modify-write is
/// protected while other connections write), and its writes and COMMIT fail.
fn lock_after_losing_the_lock_to_the_timeout_is_a_conflict(store: Store) {
    let s = start(store, &["--txn-lock-timeout-ms", "300"]);
    let tok = image("txn-lock-expired", 4 * MIB);
    let (mut holder, mut writer) = (connect(&s, &tok), connect(&s, &tok));
    holder.begin().unwrap();
    holder.lock().unwrap();
    holder.write(0, &[1; 8]).unwrap();
    writer.write(0, &[2; 8]).unwrap(); // waits out the timeout, expiring the holder
    let write = holder.write(8, &[3; 8]);
    let lock = holder.lock();
    let commit = holder.commit();
    assert_eq!(writer.read(0, 16).unwrap(), [[2u8; 8], [0; 8]].concat());
    assert!(
        matches!(&write, Err(e) if e.is_conflict())
            && matches!(&lock, Err(e) if e.is_conflict())
            && matches!(&commit, Err(e) if e.is_conflict()),
        "after losing the image lock to --txn-lock-timeout-ms, the holder's WRITE, LOCK and \
         COMMIT must fail with EPERM; got WRITE {write:?}, LOCK {lock:?}, COMMIT {commit:?}"
    );
}

#[test]
fn lock_after_losing_the_lock_to_the_timeout_is_a_conflict_local() {
    lock_after_losing_the_lock_to_the_timeout_is_a_conflict(Store::Local);
}

#[test]
fn lock_after_losing_the_lock_to_the_timeout_is_a_conflict_s3() {
    lock_after_losing_the_lock_to_the_timeout_is_a_conflict(Store::S3);
}

fn transaction_over_the_size_cap_is_enospc(store: Store) {
    let s = start(store, &["--txn-bytes-max", "1048576"]);
    let tok = image("txn-cap", 8 * MIB);
    let (mut a, mut b) = (connect(&s, &tok), connect(&s, &tok));
    a.begin().unwrap();
    a.write(0, &pattern(1, MIB as usize)).unwrap(); // exactly the cap
    assert_errno(
        a.write(MIB, &[1]),
        NBD_ENOSPC,
        "the write that crosses the cap",
    );
    // The transaction is doomed: later writes fail too, even small ones...
    assert_errno(
        a.write(2 * MIB, &[1]),
        NBD_ENOSPC,
        "a write after the crossing one",
    );
    // ...but it is still open, with read-your-writes, until the client rolls it back.
    assert_same(
        &a.read(0, 4096).unwrap(),
        &pattern(1, 4096),
        "A after ENOSPC",
    );
    assert_errno(
        a.begin(),
        NBD_EINVAL,
        "BEGIN with the doomed transaction open",
    );
    a.rollback().unwrap();
    assert_eq!(
        b.read(0, 8).unwrap(),
        vec![0; 8],
        "the oversized transaction leaked"
    );
    assert_eq!(a.read(MIB, 1).unwrap(), vec![0]);

    // COMMIT of a doomed transaction fails with ENOSPC, applies nothing, and ends it.
    a.begin().unwrap();
    a.write(0, &[5; 100]).unwrap();
    assert_errno(
        a.write(0, &vec![3; 2 * MIB as usize]),
        NBD_ENOSPC,
        "a 2 MiB write",
    );
    assert_errno(a.commit(), NBD_ENOSPC, "COMMIT of a doomed transaction");
    assert_eq!(
        b.read(0, 8).unwrap(),
        vec![0; 8],
        "a doomed transaction was committed"
    );
    a.begin().unwrap(); // the doomed transaction is gone
    a.rollback().unwrap();

    // The cap is per transaction: plain writes past it are fine.
    a.write(0, &vec![4; 2 * MIB as usize]).unwrap();
    assert_eq!(b.read(2 * MIB - 1, 2).unwrap(), vec![4, 0]);
}

#[test]
fn transaction_over_the_size_cap_is_enospc_local() {
    transaction_over_the_size_cap_is_enospc(Store::Local);
}

#[test]
fn transaction_over_the_size_cap_is_enospc_s3() {
    transaction_over_the_size_cap_is_enospc(Store::S3);
}

#[test]
fn client_over_a_unix_socket() {
    let s = Server::builder().unix().start();
    let tok = image("txn-unix", 64 * MIB);
    let mut a = connect(&s, &tok);
    assert_eq!(a.size(), 64 * MIB);
    let bs = a
        .block_sizes()
        .expect("the server sends NBD_INFO_BLOCK_SIZE");
    assert_eq!((bs.minimum, bs.preferred), (1, 4096));
    // A read longer than the maximum payload is split into several requests.
    let big = pattern(6, bs.maximum as usize + 5000);
    a.begin().unwrap();
    a.write(3, &big).unwrap_or_else(|e| panic!("{e}"));
    a.commit_fua().unwrap();
    assert_same(&a.read(3, big.len()).unwrap(), &big, "a split read");
    // A refused token: the server's reason reaches the caller.
    let bad = token::bad_signature(&token::claims(&token::image_id("x"), MIB));
    match Client::connect(&addr(&s), &bad) {
        Err(client::Error::Handshake(m)) => assert!(m.contains("token refused"), "{m}"),
        other => panic!("a bad token was not refused: {other:?}"),
    }
}

// --------------------------------------------------------------------- mvpsctl txn

const CTL_TIMEOUT: Duration = Duration::from_secs(60);

fn mvpsctl(args: &[&str]) -> Command {
    let mut c = Command::new(bins::bin("mvpsctl"));
    c.env_remove("MVPS_TOKEN").args(args);
    c
}

fn hex(data: &[u8]) -> String {
    sha256::to_hex(&sha256::digest(data))
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn mvpsctl_txn_end_to_end(store: Store) {
    let s = start(store, &[]);
    let tok = image("txn-ctl", 4 * MIB);
    let server = addr(&s);
    let mut c = connect(&s, &tok);
    let base = pattern(7, 64 * 1024);
    c.write(0, &base).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("new.bin");
    let new = pattern(8, 5000);
    std::fs::write(&file, &new).unwrap();
    let write_arg = format!("4096:{}", file.display());

    // Every expectation holds: applied (zeros first, then writes), exit 0.
    let e1 = format!("0:4096:{}", hex(&base[..4096]));
    let e2 = format!("8K:100:{}", hex(&base[8192..8292]));
    let args = [
        "txn", "--server", &server, "--token", &tok, "--expect", &e1, "--expect", &e2,
    ];
    let out = run(
        mvpsctl(&args).args(["--zero", "4000:200", "--write", &write_arg, "--fua"]),
        CTL_TIMEOUT,
    );
    assert_eq!(code(&out), Some(0), "{out}");
    let mut want = base.clone();
    want[4000..4200].fill(0);
    want[4096..9096].copy_from_slice(&new);
    assert_same(&c.read(0, want.len()).unwrap(), &want, "after mvpsctl txn");

    // A mismatch: exit 3, nothing applied.
    let stale = format!("0:4096:{}", hex(&base[..4096]));
    let args = [
        "txn", "--server", &server, "--token", &tok, "--expect", &stale,
    ];
    let out = run(
        mvpsctl(&args).args(["--write", "0:/dev/null", "--zero", "0:1M"]),
        CTL_TIMEOUT,
    );
    assert_eq!(code(&out), Some(3), "{out}");
    assert!(out.stderr.contains("expected sha256"), "{out}");
    assert_same(
        &c.read(0, want.len()).unwrap(),
        &want,
        "after a failed expectation",
    );

    // The token from MVPS_TOKEN, data from standard input.
    let mut child = mvpsctl(&["txn", "--server", &server, "--write", "60000:-"])
        .env("MVPS_TOKEN", &tok)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    let st = wait_timeout(&mut child, CTL_TIMEOUT).expect("mvpsctl txn timed out");
    assert!(st.success(), "mvpsctl txn with stdin: {st}");
    assert_eq!(c.read(60_000, 10).unwrap(), b"from stdin");

    // Errors: no token (exit 1), a range past the end (exit 1, nothing applied).
    let out = run(&mut mvpsctl(&["txn", "--server", &server]), CTL_TIMEOUT);
    assert_eq!(code(&out), Some(1), "{out}");
    assert!(out.stderr.contains("MVPS_TOKEN"), "{out}");
    let args = [
        "txn", "--server", &server, "--token", &tok, "--zero", "0:100", "--zero",
    ];
    let out = run(mvpsctl(&args).arg("4M:1"), CTL_TIMEOUT);
    assert_eq!(code(&out), Some(1), "{out}");
    assert_same(
        &c.read(0, 100).unwrap(),
        &want[..100],
        "after a failed mvpsctl txn",
    );
}

#[test]
fn mvpsctl_txn_end_to_end_local() {
    mvpsctl_txn_end_to_end(Store::Local);
}

#[test]
fn mvpsctl_txn_end_to_end_s3() {
    mvpsctl_txn_end_to_end(Store::S3);
}

#[test]
fn mvpsctl_txn_conflict_exits_4() {
    let s = start(Store::Local, &[]);
    let id = token::image_id("txn-ctl-conflict");
    let tok = token::token(&id, 4 * MIB);
    let server = addr(&s);
    let mut holder = connect(&s, &tok);
    holder.write(0, b"before").unwrap();
    // The holder locks first, so mvpsctl's LOCK waits for it; the holder then commits a
    // change, which mvpsctl's LOCK must report as a conflict.
    holder.begin().unwrap();
    holder.lock().unwrap();
    holder.write(0, b"holder").unwrap();
    let expect = format!("0:6:{}", hex(b"before"));
    let mut child = mvpsctl(&[
        "txn", "--server", &server, "--token", &tok, "--expect", &expect,
    ])
    .args(["--write", "0:/dev/null"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // mvpsctl has connected (the log shows a second connection) and sent BEGIN and LOCK.
    let connections = || {
        let log = s.log();
        log.lines()
            .filter(|l| l.contains(&id) && l.contains("connected from"))
            .count()
    };
    wait_for("mvpsctl's connection", Duration::from_secs(30), || {
        (connections() >= 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    holder.commit().unwrap();
    let st = wait_timeout(&mut child, CTL_TIMEOUT).expect("mvpsctl txn timed out");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(st.code(), Some(4), "{stderr}");
    assert!(stderr.contains("conflict: retry"), "{stderr}");
    assert_eq!(holder.read(0, 6).unwrap(), b"holder");
}
