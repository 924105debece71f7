//! A randomized model test against the real server process: thousands of random reads,
//! writes, TRIMs, WRITE_ZEROES, FLUSHes and transactions at random byte offsets over three
//! connections, interleaved with SIGKILL and SIGTERM restarts, with checkpoints every 100 ms
//! and a low write-throttle threshold (so checkpoints, WAL rewrites, compaction and
//! throttling all run under the load). Every read is compared with an in-memory reference
//! disk, and so is the whole image at the end. Guards any divergence between what the server
//! replied and what it later returns, across restarts and background work.
//!
//! Where `txn_model.rs` pins down transaction semantics on a small image with fixed seeds,
//! this one stresses I/O shapes and background work: byte-granular extents up to 1 MiB on
//! multi-MiB images, three page sizes, fast checkpoints under throttling, SIGTERM as well
//! as SIGKILL, and a fresh seed each run.
//!
//! The seed is printed; `MVPS_CONFORMANCE_SEED=<n>` replays a run.

use mvps_conformance::nbd::{self, Client};
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;
use std::collections::VecDeque;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn percent(&mut self) -> u64 {
        self.below(100)
    }
}

fn seed() -> u64 {
    match std::env::var("MVPS_CONFORMANCE_SEED") {
        Ok(s) => s.parse().expect("MVPS_CONFORMANCE_SEED is a number"),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (t.as_nanos() as u64) | 1
        }
    }
}

/// Writes of an open transaction: (offset, data), in order.
type TxnWrites = Vec<(u64, Vec<u8>)>;

/// The reference: the committed disk, and the open transaction (connection, its writes).
struct Model {
    disk: Vec<u8>,
    txn: Option<(usize, TxnWrites)>,
}

impl Model {
    /// What connection `conn` must read at `off..off+len`.
    fn read(&self, conn: usize, off: u64, len: u64) -> Vec<u8> {
        let (o, l) = (off as usize, len as usize);
        let mut out = self.disk[o..o + l].to_vec();
        if let Some((k, writes)) = &self.txn {
            if *k == conn {
                for (wo, data) in writes {
                    let (a, b) = ((*wo).max(off), (wo + data.len() as u64).min(off + len));
                    if a < b {
                        let src = &data[(a - wo) as usize..(b - wo) as usize];
                        out[(a - off) as usize..(b - off) as usize].copy_from_slice(src);
                    }
                }
            }
        }
        out
    }
}

struct Run {
    rng: Rng,
    size: u64,
    conns: Vec<Client>,
    tok: String,
    history: VecDeque<String>,
    seed: u64,
}

impl Run {
    fn log(&mut self, step: usize, what: String) {
        if self.history.len() == 30 {
            self.history.pop_front();
        }
        self.history.push_back(format!("{step}: {what}"));
    }

    fn fail(&self, msg: &str, s: &Server) -> ! {
        let h: Vec<&str> = self.history.iter().map(String::as_str).collect();
        panic!(
            "{msg}\nseed {} (MVPS_CONFORMANCE_SEED={} replays)\nlast operations:\n{}\n{}",
            self.seed,
            self.seed,
            h.join("\n"),
            s.log_tail()
        )
    }

    /// A random extent: mostly small, some up to 64 KiB, a few up to 1 MiB.
    fn extent(&mut self) -> (u64, u64) {
        let p = self.rng.percent();
        let max = if p < 60 {
            5000
        } else if p < 90 {
            64 << 10
        } else {
            1 << 20
        };
        let len = 1 + self.rng.below(max);
        (self.rng.below(self.size - len + 1), len)
    }

    fn reconnect(&mut self, s: &Server) {
        self.conns = (0..3).map(|_| s.open(&self.tok)).collect();
    }
}

fn run_model(s: &mut Server, page_size_bits: u32, size: u64, steps: usize) {
    let seed = seed();
    eprintln!("model: seed {seed}, page size 2^{page_size_bits}, {steps} steps");
    let mut cl = token::claims(&token::image_id("model"), size);
    cl.page_size_bits = page_size_bits;
    let tok = token::mint(&cl);
    let mut r = Run {
        rng: Rng(seed),
        size,
        conns: Vec::new(),
        tok,
        history: VecDeque::new(),
        seed,
    };
    r.reconnect(s);
    let mut m = Model {
        disk: vec![0; size as usize],
        txn: None,
    };
    for step in 0..steps {
        let p = r.rng.percent();
        let in_txn = m.txn.as_ref().map(|t| t.0);
        let conn = match in_txn {
            Some(k) if p < 60 => k,
            _ => r.rng.below(3) as usize,
        };
        let (off, len) = r.extent();
        match (in_txn, p) {
            // Inside a transaction only its connection writes (others' page-granular
            // read-modify-write would be a legitimate lost update the model cannot follow).
            (Some(k), 0..=39) => {
                let data = pattern(r.rng.next(), len as usize);
                r.log(step, format!("txn write conn {k} {off}+{len}"));
                if let Err(e) = r.conns[k].write(off, &data) {
                    r.fail(&format!("txn write failed: {e}"), s);
                }
                m.txn.as_mut().unwrap().1.push((off, data));
            }
            (Some(k), 60..=74) => {
                r.log(step, format!("commit conn {k}"));
                if let Err(e) = r.conns[k].command(nbd::CMD_MVPS_COMMIT_TXN) {
                    r.fail(&format!("COMMIT failed: {e}"), s);
                }
                for (o, d) in m.txn.take().unwrap().1 {
                    m.disk[o as usize..o as usize + d.len()].copy_from_slice(&d);
                }
            }
            (Some(k), 75..=82) => {
                r.log(step, format!("rollback conn {k}"));
                if let Err(e) = r.conns[k].command(nbd::CMD_MVPS_ROLLBACK_TXN) {
                    r.fail(&format!("ROLLBACK failed: {e}"), s);
                }
                m.txn = None;
            }
            (None, 0..=39) => {
                let data = pattern(r.rng.next(), len as usize);
                let fua = r.rng.percent() < 5;
                r.log(step, format!("write conn {conn} {off}+{len} fua={fua}"));
                let res = if fua {
                    r.conns[conn].write_fua(off, &data)
                } else {
                    r.conns[conn].write(off, &data)
                };
                if let Err(e) = res {
                    r.fail(&format!("write failed: {e}"), s);
                }
                m.disk[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            (None, 40..=46) => {
                let zero = r.rng.percent() < 50;
                let flags = if r.rng.percent() < 50 {
                    nbd::CMD_FLAG_NO_HOLE
                } else {
                    0
                };
                r.log(
                    step,
                    format!(
                        "{} conn {conn} {off}+{len}",
                        if zero { "zero" } else { "trim" }
                    ),
                );
                let res = if zero {
                    r.conns[conn].write_zeroes(off, len as u32, flags)
                } else {
                    r.conns[conn].trim(off, len as u32)
                };
                if let Err(e) = res {
                    r.fail(&format!("trim/zero failed: {e}"), s);
                }
                m.disk[off as usize..(off + len) as usize].fill(0);
            }
            (None, 47..=50) => {
                r.log(step, format!("flush conn {conn}"));
                if let Err(e) = r.conns[conn].flush() {
                    r.fail(&format!("flush failed: {e}"), s);
                }
            }
            (None, 51..=55) => {
                r.log(step, format!("begin conn {conn}"));
                if let Err(e) = r.conns[conn].command(nbd::CMD_MVPS_BEGIN_TXN) {
                    r.fail(&format!("BEGIN failed: {e}"), s);
                }
                m.txn = Some((conn, Vec::new()));
            }
            (_, 83..=84) => {
                // The process dies: replied writes and commits stay, an open txn goes.
                let term = r.rng.percent() < 30;
                r.log(
                    step,
                    (if term {
                        "SIGTERM + restart"
                    } else {
                        "kill -9 + restart"
                    })
                    .into(),
                );
                r.conns.clear();
                if term {
                    let st = s.terminate();
                    if st.code() != Some(0) {
                        r.fail(&format!("SIGTERM exit {st}"), s);
                    }
                } else {
                    s.kill9();
                }
                s.restart();
                r.reconnect(s);
                m.txn = None;
            }
            _ => {
                r.log(step, format!("read conn {conn} {off}+{len}"));
                let got = match r.conns[conn].read(off, len as u32) {
                    Ok(d) => d,
                    Err(e) => r.fail(&format!("read failed: {e}"), s),
                };
                let want = m.read(conn, off, len);
                if got != want {
                    let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                    r.fail(
                        &format!("read {off}+{len} differs from the model at +{at}"),
                        s,
                    );
                }
            }
        }
    }
    // Whatever is open is rolled back; then the whole image must match, on a fresh
    // connection and again after a final kill -9.
    if let Some((k, _)) = m.txn.take() {
        r.conns[k].command(nbd::CMD_MVPS_ROLLBACK_TXN).unwrap();
    }
    for round in 0..2 {
        let mut c = s.open(&r.tok);
        let mut off = 0;
        while off < size {
            let len = (size - off).min(8 << 20);
            let got = c.read(off, len as u32).unwrap();
            if got != m.disk[off as usize..(off + len) as usize] {
                r.fail(
                    &format!("final image differs in {off}+{len} (round {round})"),
                    s,
                );
            }
            off += len;
        }
        r.conns.clear();
        s.kill9();
        s.restart();
    }
    // The background work this test means to exercise did happen.
    let manifests = std::fs::read_dir(s.image_store().join("images").join(&cl.image_id))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        manifests >= 3,
        "only {manifests} manifests: checkpoints did not run"
    );
    let logs = s.all_logs();
    let count = |w: &str| logs.lines().filter(|l| l.contains(w)).count();
    eprintln!(
        "model: {manifests} manifests; log lines: {} checkpoint, {} compact, {} throttl",
        count("checkpoint"),
        count("compact"),
        count("throttl")
    );
}

fn busy_server() -> mvps_conformance::server::Builder {
    Server::builder().args([
        "--checkpoint-interval-ms",
        "100",
        "--checkpoint-interval-jitter-ms",
        "50",
        "--write-throttle-threshold-pages",
        "256",
    ])
}

#[test]
fn random_operations_match_the_model_with_4k_pages() {
    run_model(&mut busy_server().start(), 12, 8 << 20, 3000);
}

#[test]
fn random_operations_match_the_model_with_512_byte_pages() {
    run_model(&mut busy_server().start(), 9, 4 << 20, 2000);
}

#[test]
fn random_operations_match_the_model_with_64k_pages() {
    run_model(&mut busy_server().start(), 16, 16 << 20, 1500);
}
