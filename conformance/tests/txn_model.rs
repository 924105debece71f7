//! Randomized model test of the transactional extension: one seeded generator drives three
//! connections to a real `mvps-te` through interleaved transactional and plain requests
//! (READ, WRITE, TRIM, WRITE_ZEROES, FLUSH, BEGIN, LOCK, COMMIT, ROLLBACK, misuse, dropped
//! connections, server restarts), and every reply is checked against an in-memory model:
//!
//! - the committed image is a byte array; a plain write, trim or zero applies at once and
//!   counts as one change;
//! - a transaction keeps an overlay of whole pages. Its first write to a page copies the
//!   page as the connection sees it *at that moment* (the server read-modify-writes partial
//!   pages inside the transaction), then lays the new bytes over it; reads on that
//!   connection see the overlay over the committed image, reads elsewhere only the latter;
//! - COMMIT applies the overlay atomically (one change, if it wrote anything); ROLLBACK, a
//!   dropped connection and a restart discard it;
//! - LOCK fails with EPERM iff the change count moved since BEGIN (the transaction stays
//!   open); BEGIN inside a transaction and COMMIT/ROLLBACK/LOCK outside one are EINVAL.
//!
//! Requests that the image lock would block (another connection's plain write, LOCK or
//! COMMIT while one connection holds the lock) are not generated: the driver is one thread.
//! Seeds are fixed, so a failure reproduces; the message names the seed, the step and the
//! requests leading up to it. Guards read-your-writes leaks, lost or torn commits, wrong
//! conflict detection, and state that survives ROLLBACK or a restart.

use mvps::client::{self, Client};
use mvps::nbd::consts::NBD_EINVAL;
use mvps::s3::testing::{self, SeaweedFs};
use mvps_conformance::server::{Listen, Server};
use mvps_conformance::token;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const PAGES: usize = 40;
const SIZE: usize = PAGE * PAGES;
const CONNECTIONS: usize = 3;
/// Requests remembered for a failure message.
const HISTORY: usize = 40;
/// Steps between full-image comparisons on every connection.
const FULL_CHECK_EVERY: usize = 250;
/// Wall-clock budget of one run; the runs are sized to take a few seconds.
const RUN_BUDGET: Duration = Duration::from_secs(50);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// splitmix64: small, seedable, good enough to pick requests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ------------------------------------------------------------------------------- model

#[derive(Default)]
struct TxnModel {
    begin_change: u64,
    /// Whole pages written by the transaction, as the connection will see them.
    pages: BTreeMap<usize, Vec<u8>>,
    holds_lock: bool,
}

struct Model {
    disk: Vec<u8>,
    change: u64,
    txns: [Option<TxnModel>; CONNECTIONS],
}

impl Model {
    fn new() -> Model {
        Model {
            disk: vec![0; SIZE],
            change: 0,
            txns: Default::default(),
        }
    }

    fn lock_holder(&self) -> Option<usize> {
        (0..CONNECTIONS).find(|&i| self.txns[i].as_ref().is_some_and(|t| t.holds_lock))
    }

    /// What connection `i` reads at `[off, off+len)`.
    fn view(&self, i: usize, off: usize, len: usize) -> Vec<u8> {
        let mut out = self.disk[off..off + len].to_vec();
        if let Some(t) = &self.txns[i] {
            for (&p, page) in t.pages.range(off / PAGE..=(off + len - 1) / PAGE) {
                let (lo, hi) = ((p * PAGE).max(off), ((p + 1) * PAGE).min(off + len));
                out[lo - off..hi - off].copy_from_slice(&page[lo - p * PAGE..hi - p * PAGE]);
            }
        }
        out
    }

    /// A write (or zeroing, `data` all zero) of connection `i`.
    fn write(&mut self, i: usize, off: usize, data: &[u8]) {
        let Some(t) = &mut self.txns[i] else {
            self.disk[off..off + data.len()].copy_from_slice(data);
            self.change += 1;
            return;
        };
        for p in off / PAGE..=(off + data.len() - 1) / PAGE {
            let page = t
                .pages
                .entry(p)
                .or_insert_with(|| self.disk[p * PAGE..(p + 1) * PAGE].to_vec());
            let (lo, hi) = ((p * PAGE).max(off), ((p + 1) * PAGE).min(off + data.len()));
            page[lo - p * PAGE..hi - p * PAGE].copy_from_slice(&data[lo - off..hi - off]);
        }
    }

    fn commit(&mut self, i: usize) {
        let t = self.txns[i].take().expect("commit without a transaction");
        if t.pages.is_empty() {
            return;
        }
        for (p, page) in t.pages {
            self.disk[p * PAGE..(p + 1) * PAGE].copy_from_slice(&page);
        }
        self.change += 1;
    }
}

// ------------------------------------------------------------------------------ driver

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Begin,
    Write,
    Zero,
    Trim,
    Read,
    Flush,
    Lock,
    Commit,
    Rollback,
    /// BEGIN inside, or COMMIT/ROLLBACK/LOCK outside, a transaction: EINVAL.
    Misuse,
    /// Close the socket without NBD_CMD_DISC, then reconnect.
    Drop,
}

/// Weighted requests for a connection in a transaction (or not), minus those that the
/// image lock held by another connection would block.
fn choices(in_txn: bool, blocked: bool) -> Vec<(Op, usize)> {
    let mut v = if in_txn {
        vec![
            (Op::Write, 25),
            (Op::Zero, 5),
            (Op::Trim, 5),
            (Op::Read, 20),
            (Op::Lock, 8),
            (Op::Commit, 10),
            (Op::Rollback, 4),
            (Op::Misuse, 2),
            (Op::Flush, 1),
            (Op::Drop, 1),
        ]
    } else {
        vec![
            (Op::Begin, 25),
            (Op::Write, 12),
            (Op::Zero, 4),
            (Op::Trim, 4),
            (Op::Read, 15),
            (Op::Misuse, 3),
            (Op::Flush, 2),
            (Op::Drop, 1),
        ]
    };
    if blocked {
        let waits = |op: Op| match op {
            Op::Lock | Op::Commit => true,
            Op::Write | Op::Zero | Op::Trim => !in_txn,
            _ => false,
        };
        v.retain(|(op, _)| !waits(*op));
    }
    v
}

fn pick(rng: &mut Rng, choices: &[(Op, usize)]) -> Op {
    let total: usize = choices.iter().map(|c| c.1).sum();
    let mut r = rng.below(total);
    for &(op, w) in choices {
        if r < w {
            return op;
        }
        r -= w;
    }
    unreachable!("weights add up")
}

/// A range: page-aligned a third of the time, else any offset; 1 byte to 3 pages long.
fn range(rng: &mut Rng) -> (usize, usize) {
    if rng.below(3) == 0 {
        let p = rng.below(PAGES);
        let n = 1 + rng.below(3.min(PAGES - p));
        return (p * PAGE, n * PAGE);
    }
    let off = rng.below(SIZE);
    let len = 1 + rng.below((3 * PAGE).min(SIZE - off));
    (off, len)
}

struct Run {
    seed: u64,
    rng: Rng,
    model: Model,
    conns: Vec<Client>,
    addr: String,
    tok: String,
    history: VecDeque<String>,
    step: usize,
    conflicts: u64,
    commits: u64,
}

impl Run {
    fn fail(&self, what: String) -> ! {
        let h: Vec<&str> = self.history.iter().map(String::as_str).collect();
        panic!(
            "seed {} step {}: {what}\nrecent requests (oldest first):\n  {}",
            self.seed,
            self.step,
            h.join("\n  ")
        );
    }

    fn note(&mut self, s: String) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(s);
    }

    fn connect(&self) -> Client {
        let mut c = Client::connect(&self.addr, &self.tok).expect("connecting");
        c.set_timeout(Some(IO_TIMEOUT)).unwrap();
        c
    }

    fn check<T>(&self, r: client::Result<T>, what: &str) -> T {
        r.unwrap_or_else(|e| self.fail(format!("{what}: {e}")))
    }

    fn check_read(&mut self, i: usize, off: usize, len: usize) {
        let got = self.conns[i].read(off as u64, len);
        let got = self.check(got, "READ");
        let want = self.model.view(i, off, len);
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            let (g, w) = (got[at], want[at]);
            self.fail(format!(
                "conn {i} READ {off}+{len}: byte {} is {g:#04x}, the model says {w:#04x}",
                off + at
            ));
        }
    }

    fn step(&mut self) {
        let i = self.rng.below(CONNECTIONS);
        let in_txn = self.model.txns[i].is_some();
        let blocked = self.model.lock_holder().is_some_and(|h| h != i);
        let op = pick(&mut self.rng, &choices(in_txn, blocked));
        let (off, len) = range(&mut self.rng);
        let tag = if in_txn { "txn" } else { "plain" };
        self.note(format!("conn {i} {tag} {op:?} {off}+{len}"));
        match op {
            Op::Begin => {
                let r = self.conns[i].begin();
                self.check(r, "BEGIN");
                let begin_change = self.model.change;
                self.model.txns[i] = Some(TxnModel {
                    begin_change,
                    ..Default::default()
                });
            }
            Op::Write => {
                let data = self.rng.bytes(len);
                let r = self.conns[i].write(off as u64, &data);
                self.check(r, "WRITE");
                self.model.write(i, off, &data);
            }
            Op::Zero | Op::Trim => {
                let c = &mut self.conns[i];
                let r = match op {
                    Op::Zero => c.write_zeroes(off as u64, len as u64),
                    _ => c.trim(off as u64, len as u64),
                };
                self.check(r, "WRITE_ZEROES/TRIM");
                self.model.write(i, off, &vec![0; len]);
            }
            Op::Read => self.check_read(i, off, len),
            Op::Flush => {
                let r = self.conns[i].flush();
                self.check(r, "FLUSH");
            }
            Op::Lock => self.lock(i),
            Op::Commit => {
                let r = self.conns[i].commit();
                self.check(r, "COMMIT");
                self.model.commit(i);
                self.commits += 1;
            }
            Op::Rollback => {
                let r = self.conns[i].rollback();
                self.check(r, "ROLLBACK");
                self.model.txns[i] = None;
            }
            Op::Misuse => self.misuse(i, in_txn),
            Op::Drop => {
                let fresh = self.connect();
                let c = std::mem::replace(&mut self.conns[i], fresh);
                c.hard_disconnect();
                self.model.txns[i] = None;
            }
        }
    }

    fn lock(&mut self, i: usize) {
        let r = self.conns[i].lock();
        let t = self.model.txns[i]
            .as_mut()
            .expect("LOCK is generated inside a transaction");
        let conflict = !t.holds_lock && t.begin_change != self.model.change;
        match r {
            Ok(()) if !conflict => t.holds_lock = true,
            Err(e) if conflict && e.is_conflict() => self.conflicts += 1,
            r => {
                let want = if conflict { "EPERM" } else { "success" };
                self.fail(format!("conn {i} LOCK: the model wants {want}, got {r:?}"))
            }
        }
    }

    fn misuse(&mut self, i: usize, in_txn: bool) {
        let c = &mut self.conns[i];
        let r = if in_txn {
            c.begin()
        } else {
            match self.rng.below(3) {
                0 => c.commit(),
                1 => c.rollback(),
                _ => c.lock(),
            }
        };
        if r.as_ref().err().and_then(|e| e.errno()) != Some(NBD_EINVAL) {
            self.fail(format!(
                "conn {i} misuse (in txn: {in_txn}): want EINVAL, got {r:?}"
            ));
        }
    }

    fn check_everything(&mut self) {
        for i in 0..CONNECTIONS {
            self.check_read(i, 0, SIZE);
        }
    }
}

/// One run: `steps` requests; a `kill -9` and restart after each step in `restarts`.
fn run(seed: u64, server: &mut Server, steps: usize, restarts: &[usize]) {
    let started = Instant::now();
    let tok = token::token(&token::image_id(&format!("txn-model-{seed}")), SIZE as u64);
    let addr = match &server.listen {
        Listen::Tcp(p) => format!("127.0.0.1:{p}"),
        Listen::Unix(p) => format!("unix:{}", p.display()),
    };
    let mut r = Run {
        seed,
        rng: Rng(seed),
        model: Model::new(),
        conns: Vec::new(),
        addr,
        tok,
        history: VecDeque::new(),
        step: 0,
        conflicts: 0,
        commits: 0,
    };
    r.conns = (0..CONNECTIONS).map(|_| r.connect()).collect();
    for step in 0..steps {
        r.step = step;
        assert!(
            started.elapsed() < RUN_BUDGET,
            "seed {seed}: over budget at step {step}"
        );
        r.step();
        if step % FULL_CHECK_EVERY == FULL_CHECK_EVERY - 1 {
            r.check_everything();
        }
        if restarts.contains(&step) {
            r.note("server kill -9 and restart".into());
            server.kill9();
            server.restart();
            r.conns = (0..CONNECTIONS).map(|_| r.connect()).collect();
            r.model.txns = Default::default(); // open transactions died with the server
            r.check_everything();
        }
    }
    // Settle: open transactions roll back; a clean restart keeps exactly the model.
    for i in 0..CONNECTIONS {
        if r.model.txns[i].take().is_some() {
            let res = r.conns[i].rollback();
            r.check(res, "final ROLLBACK");
        }
    }
    r.check_everything();
    for c in std::mem::take(&mut r.conns) {
        r.check(c.disconnect(), "DISC");
    }
    server.terminate();
    server.restart();
    r.conns = vec![r.connect()];
    r.step = steps;
    r.check_read(0, 0, SIZE);
    eprintln!(
        "seed {seed}: {steps} steps, {} commits, {} LOCK conflicts, {} changes, {:?}",
        r.commits,
        r.conflicts,
        r.model.change,
        started.elapsed()
    );
}

fn s3_server(weed: &SeaweedFs, args: &[&str]) -> Server {
    let bucket = weed.fresh_bucket();
    let mut b = Server::builder().args(args.iter().copied()).args([
        "--image-store",
        "s3",
        "--image-store-s3-bucket",
        &bucket,
        "--image-store-s3-prefix",
        "model/",
    ]);
    for (k, v) in weed.env() {
        b = b.env(k, &v);
    }
    b.start()
}

/// Checkpoints every ~100 ms, so committed pages move into layers under open transactions.
const FAST_CHECKPOINTS: [&str; 4] = [
    "--checkpoint-interval-ms",
    "100",
    "--checkpoint-interval-jitter-ms",
    "20",
];

#[test]
fn model_local_seeds_1_to_4() {
    let mut s = Server::start();
    for seed in 1..=4 {
        run(seed, &mut s, 4000, &[]);
    }
}

#[test]
fn model_local_with_restarts_and_checkpoints() {
    let mut s = Server::builder().args(FAST_CHECKPOINTS).start();
    for seed in [11, 12] {
        run(seed, &mut s, 4000, &[1000, 2500, 3500]);
    }
}

#[test]
fn model_s3_with_restarts_and_checkpoints() {
    let weed: Arc<SeaweedFs> = testing::shared();
    let mut s = s3_server(&weed, &FAST_CHECKPOINTS);
    for seed in [21, 22] {
        run(seed, &mut s, 3000, &[1000, 2000]);
    }
    drop(s);
}

#[test]
fn model_itself() {
    let mut m = Model::new();
    m.write(0, 10, &[1; 5]); // plain
    m.txns[1] = Some(TxnModel {
        begin_change: m.change,
        ..Default::default()
    });
    m.write(1, 4094, &[2; 4]); // partial pages 0 and 1, snapshotting them now
    m.write(0, 100, &[3; 1]); // a plain write to page 0 after the snapshot
    assert_eq!(m.view(0, 99, 2), vec![0, 3]);
    assert_eq!(m.view(1, 99, 2), vec![0, 0]);
    assert_eq!(m.view(1, 4093, 6), vec![0, 2, 2, 2, 2, 0]);
    assert_eq!(m.view(1, 10, 2), vec![1, 1]);
    m.commit(1);
    // Whole snapshotted pages land: the plain byte at 100 reverts to the snapshot's 0.
    assert_eq!(m.view(0, 99, 2), vec![0, 0]);
    assert_eq!(m.view(2, 4093, 6), vec![0, 2, 2, 2, 2, 0]);
    assert_eq!(m.change, 3);
    assert_eq!(
        choices(false, true)
            .iter()
            .filter(|c| c.0 == Op::Write)
            .count(),
        0
    );
    assert_eq!(
        choices(true, true)
            .iter()
            .filter(|c| c.0 == Op::Commit)
            .count(),
        0
    );
}
