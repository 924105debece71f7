//! Model-based tests of the engine: random writes, zeroes, trims, flushes, checkpoints (which
//! move the WAL on to new segments and delete old ones) and restarts, checked byte for byte
//! against a plain in-memory disk.

use super::{BufferStore, Session, SessionConfig};
use crate::store::local::LocalStore;
use crate::store::ImageStore;
use std::path::Path;
use std::sync::Arc;

pub(crate) struct Rng(u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        // xorshift64*: deterministic per seed, good enough to pick operations.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(crate) fn cfg() -> SessionConfig {
    SessionConfig {
        checkpoint_interval_ms: 3_600_000,
        checkpoint_interval_jitter_ms: 0,
        write_throttle_threshold_pages: 1 << 40,
        disable_image_store_write: false,
        wal_segment_checkpoint_bytes: 1 << 20,
        txn_bytes_max: 64 << 20,
        txn_lock_timeout_ms: 500,
        policy: super::debt::Policy::DEFAULT,
    }
}

pub(crate) fn open(
    dir: &Path,
    store: Arc<dyn ImageStore>,
    bits: u32,
) -> (Arc<BufferStore>, Arc<Session>) {
    let b = Arc::new(BufferStore::open(&dir.join("buffer"), store, cfg()).unwrap());
    let s = b.attach("model.mvps-image", bits).unwrap();
    (b, s)
}

fn local(dir: &Path) -> Arc<dyn ImageStore> {
    Arc::new(LocalStore::open(&dir.join("images")).unwrap())
}

/// A fresh bucket on the test SeaweedFS, which runs while the first value is held.
fn s3() -> (Arc<crate::s3::testing::SeaweedFs>, Arc<dyn ImageStore>) {
    let server = crate::s3::testing::shared();
    let store = Arc::new(server.fresh_store("engine-test/"));
    (server, store)
}

/// `on_both_stores! { fn name(dir, store) { ... } }` defines the tests `name::local` and
/// `name::s3`: the body runs once on a local image store and once on S3 (SeaweedFS), each
/// with a fresh temp dir for the buffer store.
macro_rules! on_both_stores {
    ($(#[doc = $doc:literal])* fn $name:ident($dir:ident, $store:ident) $body:block) => {
        $(#[doc = $doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn body($dir: &Path, $store: Arc<dyn ImageStore>) $body
            #[test]
            fn local() {
                let d = tempfile::tempdir().unwrap();
                body(d.path(), crate::engine::tests::local(d.path()));
            }
            #[test]
            fn s3() {
                let d = tempfile::tempdir().unwrap();
                let (_server, store) = crate::engine::tests::s3();
                body(d.path(), store);
            }
        }
    };
}

fn check_all(s: &Session, model: &[u8]) {
    let mut got = vec![0u8; model.len()];
    s.read(None, 0, &mut got).unwrap();
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("byte {i}: engine has {}, model has {}", got[i], model[i]);
    }
}

/// Checks the image against `model`, shuts the session down, opens it again from the same
/// buffer store and image store, and checks again.
fn check_then_restart_and_check(
    dir: &Path,
    store: Arc<dyn ImageStore>,
    bits: u32,
    (b, s): (Arc<BufferStore>, Arc<Session>),
    model: &[u8],
) {
    check_all(&s, model);
    b.shutdown();
    drop((s, b));
    let (b, s) = open(dir, store, bits);
    check_all(&s, model);
    b.shutdown();
}

/// Runs `steps` random operations against the engine and the model.
pub(crate) fn run_model(dir: &Path, store: Arc<dyn ImageStore>, seed: u64, steps: usize) {
    let bits = 9;
    let size = 256u64 << bits;
    let mut rng = Rng(seed | 1);
    let mut model = vec![0u8; size as usize];
    let (mut b, mut s) = open(dir, store.clone(), bits);
    for step in 0..steps {
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(5000));
        match rng.below(20) {
            0..=8 => {
                let fill = (step % 251) as u8 + 1;
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                s.write(None, off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            9..=10 => {
                s.write_zeroes(None, off, len, rng.below(2) == 0).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            11..=12 => {
                let mut got = vec![0u8; len as usize];
                s.read(None, off, &mut got).unwrap();
                assert_eq!(
                    got,
                    &model[off as usize..(off + len) as usize],
                    "step {step}"
                );
            }
            13 => s.flush().unwrap(),
            14..=16 => {
                s.checkpoint().unwrap();
            }
            _ => {
                // Restart: drop everything and reopen from manifest + WAL.
                b.shutdown();
                drop(s);
                drop(b);
                (b, s) = open(dir, store.clone(), bits);
                check_all(&s, &model);
            }
        }
    }
    check_all(&s, &model);
    b.shutdown();
}

#[test]
fn model_local_store() {
    for seed in 1..=6u64 {
        let dir = tempfile::tempdir().unwrap();
        run_model(dir.path(), local(dir.path()), seed * 7919, 300);
    }
}

#[test]
fn model_s3_store() {
    for seed in 1..=2u64 {
        let dir = tempfile::tempdir().unwrap();
        let (_server, store) = s3();
        run_model(dir.path(), store, seed * 104_729, 200);
    }
}

on_both_stores! {
/// A lost buffer store loses only what was not checkpointed: a new buffer store takes the
/// image over from its manifest.
fn lost_buffer_store_keeps_checkpointed_data(dir, store) {
    let (b, s) = open(dir, store.clone(), 12);
    s.write(None, 0, &[7u8; 8192]).unwrap();
    s.checkpoint().unwrap();
    s.write(None, 4096, &[9u8; 4096]).unwrap();
    b.shutdown();
    drop((s, b));
    std::fs::remove_dir_all(dir.join("buffer")).unwrap();
    let (b, s) = open(dir, store, 12);
    let mut got = vec![0u8; 8192];
    s.read(None, 0, &mut got).unwrap();
    assert_eq!(got, vec![7u8; 8192]);
    b.shutdown();
}
}

fn segments_on_disk(dir: &Path) -> Vec<u64> {
    super::wal::list_segments(&dir.join("buffer"), "model.mvps-image")
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

on_both_stores! {
/// Each checkpoint moves the WAL on to a new segment and deletes the checkpointed ones, except
/// a segment an open transaction wrote to: that stays until the transaction ends, and its
/// COMMIT (in a later segment) still replays after a restart.
fn checkpoints_delete_wal_segments_unless_a_transaction_pins_them(dir, store) {
    let (b, s) = open(dir, store.clone(), 12);
    assert_eq!(segments_on_disk(dir), vec![1]);
    s.write(None, 0, &[1u8; 8192]).unwrap();
    let mut t = s.begin().unwrap();
    s.write(Some(&mut t), 40960, &[5u8; 4096]).unwrap();
    s.checkpoint().unwrap();
    // Segment 1 holds the open transaction's page.
    assert_eq!(segments_on_disk(dir), vec![1, 2]);
    s.write(None, 8192, &[2u8; 4096]).unwrap();
    s.checkpoint().unwrap();
    assert_eq!(segments_on_disk(dir), vec![1, 2, 3]);
    s.commit(t).unwrap();
    s.write(None, 12288, &[3u8; 4096]).unwrap();
    // Restart before the next checkpoint: the commit in segment 3 replays data in segment 1.
    b.shutdown();
    drop((s, b));
    let (b, s) = open(dir, store.clone(), 12);
    let mut got = vec![0u8; 4096];
    s.read(None, 40960, &mut got).unwrap();
    assert_eq!(got, vec![5u8; 4096]);
    s.checkpoint().unwrap();
    assert_eq!(segments_on_disk(dir), vec![4]);
    let mut all = vec![0u8; 16384];
    s.read(None, 0, &mut all).unwrap();
    assert_eq!(&all[..8192], &[1u8; 8192][..]);
    assert_eq!(&all[8192..12288], &[2u8; 4096][..]);
    assert_eq!(&all[12288..], &[3u8; 4096][..]);
    b.shutdown();
    drop((s, b));
    // Everything is in layers now: a lost buffer store loses nothing.
    std::fs::remove_dir_all(dir.join("buffer")).unwrap();
    let (b, s) = open(dir, store, 12);
    s.read(None, 40960, &mut got).unwrap();
    assert_eq!(got, vec![5u8; 4096]);
    b.shutdown();
}
}

on_both_stores! {
/// Two buffer stores on one image: the one that took over last owns it; the first is fenced at
/// its next checkpoint and nothing it wrote afterwards becomes visible.
fn takeover_fences_old_writer(dir, store) {
    let (b1, s1) = open(dir, store.clone(), 12);
    s1.write(None, 0, &[1u8; 4096]).unwrap();
    s1.checkpoint().unwrap();
    let b2 =
        Arc::new(BufferStore::open(&dir.join("buffer2"), store.clone(), cfg()).unwrap());
    let s2 = b2.attach("model.mvps-image", 12).unwrap();
    s1.write(None, 0, &[2u8; 4096]).unwrap();
    let err = s1.checkpoint().unwrap_err();
    assert!(matches!(err, crate::engine::Error::Fenced { .. }), "{err}");
    assert!(
        s1.write(None, 0, &[3u8; 4096]).is_err(),
        "a fenced session refuses writes"
    );
    let mut got = vec![0u8; 4096];
    s2.read(None, 0, &mut got).unwrap();
    assert_eq!(got, vec![1u8; 4096]);
    // The old buffer store, restarted, refuses to serve the image it no longer owns.
    b1.shutdown();
    drop((s1, b1));
    let b1 = Arc::new(BufferStore::open(&dir.join("buffer"), store, cfg()).unwrap());
    let e = b1.attach("model.mvps-image", 12).err().expect("refused");
    assert!(e.to_string().contains("owned by buffer store"), "{e}");
    b2.shutdown();
}
}

on_both_stores! {
fn page_size_mismatch_refused(dir, store) {
    let (b, s) = open(dir, store.clone(), 12);
    s.write(None, 0, &[1u8; 10]).unwrap();
    b.shutdown();
    drop((s, b));
    let b = Arc::new(BufferStore::open(&dir.join("buffer"), store, cfg()).unwrap());
    assert!(b.attach("model.mvps-image", 9).is_err());
}
}

#[test]
fn second_process_on_buffer_store_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    let _b = BufferStore::open(&dir.path().join("buffer"), store.clone(), cfg()).unwrap();
    let e = BufferStore::open(&dir.path().join("buffer"), store, cfg())
        .err()
        .unwrap();
    assert!(e.contains("in use by another mvps-te"), "{e}");
}

mod txn {
    use super::*;
    use crate::engine::Error;

    fn read(s: &Session, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        s.read(None, off, &mut b).unwrap();
        b
    }

    on_both_stores! {
    /// Read-your-writes inside, invisible outside until COMMIT, then visible at once.
    fn isolation_and_commit(dir, store) {
        let (b, s) = open(dir, store, 9);
        let mut t = s.begin().unwrap();
        s.write(Some(&mut t), 100, &[5u8; 1000]).unwrap();
        s.write_zeroes(Some(&mut t), 300, 10, false).unwrap();
        let mut mine = vec![0u8; 1200];
        s.read(Some(&t), 0, &mut mine).unwrap();
        assert_eq!(&mine[100..300], &[5u8; 200][..]);
        assert_eq!(&mine[300..310], &[0u8; 10][..]);
        assert_eq!(&mine[310..1100], &[5u8; 790][..]);
        assert_eq!(
            read(&s, 0, 1200),
            vec![0u8; 1200],
            "others see nothing before COMMIT"
        );
        s.commit(t).unwrap();
        assert_eq!(read(&s, 0, 1200), mine);
        b.shutdown();
    }
    }

    on_both_stores! {
    fn rollback_discards(dir, store) {
        let (b, s) = open(dir, store, 9);
        s.write(None, 0, &[1u8; 512]).unwrap();
        let mut t = s.begin().unwrap();
        s.write(Some(&mut t), 0, &[2u8; 512]).unwrap();
        s.rollback(t);
        assert_eq!(read(&s, 0, 512), vec![1u8; 512]);
        b.shutdown();
    }
    }

    on_both_stores! {
    /// LOCK fails once anything committed since BEGIN (a plain write counts).
    fn lock_conflict(dir, store) {
        let (b, s) = open(dir, store, 9);
        let mut t = s.begin().unwrap();
        s.write(None, 0, &[1u8; 10]).unwrap();
        assert!(matches!(s.lock(&mut t), Err(Error::Conflict { .. })));
        s.rollback(t);
        let mut t = s.begin().unwrap();
        s.lock(&mut t).unwrap();
        s.write(Some(&mut t), 0, &[3u8; 10]).unwrap();
        s.commit(t).unwrap();
        assert_eq!(read(&s, 0, 10), vec![3u8; 10]);
        b.shutdown();
    }
    }

    on_both_stores! {
    /// While a transaction holds the lock, plain writes wait; a holder past the timeout loses
    /// the lock and its COMMIT fails.
    fn lock_blocks_writers_until_timeout(dir, store) {
        let (b, s) = open(dir, store, 9);
        let mut t = s.begin().unwrap();
        s.lock(&mut t).unwrap();
        s.write(Some(&mut t), 0, &[7u8; 10]).unwrap();
        let started = std::time::Instant::now();
        s.write(None, 512, &[1u8; 10]).unwrap(); // waits for the 500 ms lock timeout
        assert!(started.elapsed() >= std::time::Duration::from_millis(400));
        assert!(
            matches!(s.lock(&mut t), Err(Error::Conflict { .. })),
            "LOCK after expiry"
        );
        assert!(matches!(s.commit(t), Err(Error::Conflict { .. })));
        assert_eq!(
            read(&s, 0, 10),
            vec![0u8; 10],
            "the expired transaction never lands"
        );
        b.shutdown();
    }
    }

    on_both_stores! {
    /// A transaction is in the WAL as one unit: committed ones survive a restart whole,
    /// uncommitted ones vanish whole, and the change count moves once per commit.
    fn recovery_all_or_nothing(dir, store) {
        let (b, s) = open(dir, store.clone(), 9);
        let mut t1 = s.begin().unwrap();
        s.write(Some(&mut t1), 0, &[1u8; 4096]).unwrap();
        s.write(Some(&mut t1), 8192, &[1u8; 100]).unwrap();
        s.commit(t1).unwrap();
        let mut t2 = s.begin().unwrap();
        s.write(Some(&mut t2), 0, &[2u8; 4096]).unwrap();
        // Restart with t2 open: as if the process died before its COMMIT.
        b.shutdown();
        std::mem::forget(t2);
        drop((s, b));
        let (b, s) = open(dir, store, 9);
        assert_eq!(read(&s, 0, 4096), vec![1u8; 4096]);
        assert_eq!(read(&s, 8192, 100), vec![1u8; 100]);
        b.shutdown();
    }
    }

    on_both_stores! {
    fn too_large_refused(dir, store) {
        let (b, s) = open(dir, store, 12);
        let mut t = s.begin().unwrap();
        let big = vec![1u8; 32 << 20];
        s.write(Some(&mut t), 0, &big).unwrap();
        s.write(Some(&mut t), 32 << 20, &big).unwrap();
        assert!(matches!(
            s.write(Some(&mut t), 64 << 20, &[1]),
            Err(Error::TxnTooLarge { .. })
        ));
        assert!(
            matches!(
                s.write(Some(&mut t), 0, &[1]),
                Err(Error::TxnTooLarge { .. })
            ),
            "once too large, every later write of the transaction fails too"
        );
        assert!(matches!(s.commit(t), Err(Error::TxnTooLarge { .. })));
        assert_eq!(read(&s, 0, 4), vec![0u8; 4], "nothing of it was committed");
        b.shutdown();
    }
    }
}

on_both_stores! {
/// Compaction keeps the layer count logarithmic: 40 small checkpoints leave a handful of
/// layers, and the image (including trimmed ranges) reads back the same before and after a
/// restart from the compacted manifest.
fn compaction_bounds_layers(dir, store) {
    let (b, s) = open(dir, store.clone(), 9);
    let size = 64 << 9;
    let mut model = vec![0u8; size];
    for i in 0..40u64 {
        let off = (i * 7919) % (size as u64 - 2000);
        if i % 5 == 4 {
            s.write_zeroes(None, off, 1500, false).unwrap();
            model[off as usize..off as usize + 1500].fill(0);
        } else {
            let data = vec![i as u8 + 1; 2000];
            s.write(None, off, &data).unwrap();
            model[off as usize..off as usize + 2000].copy_from_slice(&data);
        }
        s.checkpoint().unwrap();
    }
    s.compact().unwrap(); // the compaction thread may still be behind the last checkpoint
    let layers = s.version.layers().len();
    assert!(layers < 8, "{layers} layers after 40 checkpoints");
    check_then_restart_and_check(dir, store, 9, (b, s), &model);
}
}

on_both_stores! {
/// A layer whose every page newer layers cover leaves the manifest without being merged; one
/// that still shows a single page stays; the image reads the same before and after.
fn layers_that_newer_ones_cover_are_dropped(dir, store) {
    // A policy that never merges, so that only dropping can lower the count.
    let policy = crate::engine::debt::Policy {
        deltas_max: 100,
        base_merge_ratio: 1000,
        ..crate::engine::debt::Policy::DEFAULT
    };
    let cfg = SessionConfig { policy, ..cfg() };
    let b = Arc::new(BufferStore::open(&dir.join("buffer"), store.clone(), cfg).unwrap());
    let s = b.attach("model.mvps-image", 9).unwrap();
    let mut model = vec![0u8; 64 << 9];
    let mut put = |s: &Session, first: usize, pages: usize, v: u8| {
        let data = vec![v; pages << 9];
        s.write(None, (first << 9) as u64, &data).unwrap();
        model[first << 9..(first + pages) << 9].copy_from_slice(&data);
        s.checkpoint().unwrap();
        // (The compaction thread may run the same pass concurrently: either way it is done.)
        s.compact().unwrap();
    };
    let blob_ids = |s: &Session| -> Vec<String> {
        let m = s.version.manifest().unwrap();
        m.layers.iter().map(|l| l.blob_id.clone()).collect()
    };
    put(&s, 0, 64, 1); // L1: all of it
    let l1 = blob_ids(&s)[0].clone();
    put(&s, 0, 32, 2); // L2
    put(&s, 16, 32, 3); // L3: pages 48..64 of L1 still show
    assert_eq!(blob_ids(&s).len(), 3);
    put(&s, 32, 32, 4); // L4: now L2..L4 cover L1; pages 0..16 of L2 still show
    let ids = blob_ids(&s);
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(!ids.contains(&l1), "the covered layer is gone");
    assert_eq!(s.version.layers().len(), 3);
    check_then_restart_and_check(dir, store, 9, (b, s), &model);
}
}

on_both_stores! {
/// A transaction whose write failed cannot commit the rest: COMMIT fails, nothing lands.
fn failed_write_dooms_transaction(dir, store) {
    let (b, s) = open(dir, store, 9);
    let mut t = s.begin().unwrap();
    s.write(Some(&mut t), 0, &[1u8; 512]).unwrap();
    t.failed = true; // as set by a write that failed (EIO, expired lock, ...)
    assert!(matches!(
        s.commit(t),
        Err(crate::engine::Error::Conflict { .. })
    ));
    let mut got = vec![9u8; 512];
    s.read(None, 0, &mut got).unwrap();
    assert_eq!(got, vec![0u8; 512]);
    b.shutdown();
}
}

on_both_stores! {
/// Checkpoints (with segment rotation and compaction) running while another thread writes:
/// the writes that land between a snapshot and its manifest are kept, before and after a
/// restart.
fn checkpoints_concurrent_with_writes(dir, store) {
    let (b, s) = open(dir, store.clone(), 9);
    let size = 128u64 << 9;
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            let mut model = vec![0u8; size as usize];
            let mut rng = Rng(42);
            for i in 0..20_000u64 {
                let off = rng.below(size - 3000);
                let len = 1 + rng.below(3000);
                let data = vec![(i % 250) as u8 + 1; len as usize];
                s.write(None, off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            model
        })
    };
    while !writer.is_finished() {
        s.checkpoint().unwrap();
    }
    let model = writer.join().unwrap();
    check_all(&s, &model);
    s.checkpoint().unwrap();
    check_then_restart_and_check(dir, store, 9, (b, s), &model);
}
}

on_both_stores! {
/// The compaction policy carried out by the engine, scaled down (partitions of 64 pages, at
/// most 4 deltas): after random writes, sequential runs and trims, each checkpointed and
/// followed by a compaction pass, the debt is within the policy's limits, and the image
/// reads as the model says — also after a restart from the layers alone.
fn compaction_keeps_debt_within_limits(dir, store) {
    use crate::engine::debt::{Policy, Shape};
    let policy = Policy {
        deltas_max: 4,
        stored_per_live_max: 2,
        stored_slack_bytes: 16 << 9,
        base_partition_bytes: 64 << 9,
        base_layers_coalesce: 4,
        tier_base_bytes: 4 << 9,
        ..Policy::DEFAULT
    };
    let cfg = SessionConfig { policy, ..cfg() };
    let b = Arc::new(BufferStore::open(&dir.join("buffer"), store.clone(), cfg).unwrap());
    let s = b.attach("model.mvps-image", 9).unwrap();
    let pages = 512u64;
    let mut model = vec![0u8; (pages << 9) as usize];
    let mut rng = Rng(7);
    let mut saw_merge = false;
    for round in 0..40u64 {
        let v = (round % 250) as u8 + 1;
        match rng.below(5) {
            0 | 1 => {
                for _ in 0..1 + rng.below(40) {
                    let p = rng.below(pages);
                    s.write(None, p << 9, &[v; 512]).unwrap();
                    model[(p << 9) as usize..((p + 1) << 9) as usize].fill(v);
                }
            }
            2 | 3 => {
                let p = rng.below(pages);
                let n = (1 + rng.below(150)).min(pages - p);
                s.write(None, p << 9, &vec![v; (n << 9) as usize]).unwrap();
                model[(p << 9) as usize..((p + n) << 9) as usize].fill(v);
            }
            _ => {
                let p = rng.below(pages);
                let n = (1 + rng.below(60)).min(pages - p);
                s.write_zeroes(None, p << 9, n << 9, false).unwrap();
                model[(p << 9) as usize..((p + n) << 9) as usize].fill(0);
            }
        }
        s.checkpoint().unwrap();
        s.compact().unwrap();
        let layers: Vec<Arc<crate::engine::layer::Layer>> =
            s.version.layers().into_iter().rev().collect();
        let shapes: Vec<Shape> = crate::engine::compaction::shapes(&layers);
        let live = crate::engine::compaction::live_pages(&layers) << 9;
        let debt = crate::engine::debt::Debt::measure(&shapes, live);
        assert_eq!(s.debt(), debt, "the session measured the same debt");
        assert!(debt.deltas <= policy.deltas_max, "round {round}: {debt:?}");
        assert!(debt.read_depth <= policy.deltas_max + 1, "round {round}: {debt:?}");
        assert!(!policy.stored_past(&debt, policy.stored_per_live_max), "round {round}: {debt:?}");
        assert!(debt.layers <= policy.layers_limit(pages << 9), "round {round}: {debt:?}");
        saw_merge |= debt.layers > 1 && debt.deltas == 0;
        check_all(&s, &model);
    }
    assert!(saw_merge, "deltas were merged into a base of several partitions");
    check_then_restart_and_check(dir, store, 9, (b, s), &model);
}
}

on_both_stores! {
/// With image-store writes disabled nothing is checkpointed, but the WAL still moves on to
/// new segments as they fill (none outgrows its limit), and a restart replays them all.
fn without_uploads_the_wal_still_moves_on_to_new_segments(dir, store) {
    let cfg = SessionConfig {
        disable_image_store_write: true,
        wal_segment_checkpoint_bytes: 64 << 10,
        ..cfg()
    };
    let open_it = || {
        let b = Arc::new(
            BufferStore::open(&dir.join("buffer"), store.clone(), cfg.clone()).unwrap(),
        );
        let s = b.attach("model.mvps-image", 12).unwrap();
        (b, s)
    };
    let (b, s) = open_it();
    for i in 0..64u64 {
        s.write(None, (i % 16) << 12, &[i as u8 + 1; 4096]).unwrap();
        if i % 8 == 7 {
            assert_eq!(s.checkpoint().unwrap(), 0);
        }
    }
    let segments = segments_on_disk(dir);
    assert!(segments.len() >= 3, "segments {segments:?}");
    b.shutdown();
    drop((s, b));
    let (b, s) = open_it();
    for page in 0..16u64 {
        let mut got = vec![0u8; 4096];
        s.read(None, page << 12, &mut got).unwrap();
        assert_eq!(got, vec![48 + page as u8 + 1; 4096], "page {page}");
    }
    b.shutdown();
}
}

on_both_stores! {
/// Write pacing end to end: while compaction cannot run (the test holds its pass), each
/// checkpoint of the same page deepens the reads; past the slowdown threshold writes still
/// complete (slowed), past the stop threshold a write waits — reads go on — and it completes,
/// with its data, once compaction has run.
fn writes_wait_for_compaction_past_the_stop_threshold(dir, store) {
    use crate::engine::debt::{Pace, Policy};
    use std::sync::atomic::Ordering;
    let policy = Policy {
        read_depth_slowdown: 2,
        read_depth_stop: 3,
        ..Policy::DEFAULT
    };
    let cfg = SessionConfig { policy, ..cfg() };
    let b = Arc::new(BufferStore::open(&dir.join("buffer"), store.clone(), cfg).unwrap());
    let s = b.attach("model.mvps-image", 9).unwrap();
    let held = s.compactor.one_at_a_time();
    for v in 1..=3u8 {
        s.write(None, 0, &[v; 512]).unwrap();
        s.checkpoint().unwrap();
    }
    assert_eq!(s.debt().read_depth, 3);
    assert!(matches!(policy.pace(&s.debt()), Pace::Slow(_)));
    s.write(None, 0, &[4; 512]).unwrap(); // slowed, not stopped
    assert_eq!(s.pace_level.load(Ordering::Acquire), 1, "slowed down");
    s.checkpoint().unwrap();
    assert_eq!(policy.pace(&s.debt()), Pace::Stop, "{:?}", s.debt());
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || s.write(None, 512, &[5; 512]))
    };
    // A stalled write does not finish while compaction is held; reads are not paced.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let waited = !writer.is_finished();
    let level = s.pace_level.load(Ordering::Acquire);
    let mut page = [0u8; 512];
    let read = s.read(None, 0, &mut page);
    // (Asserted once compaction is let go: a panic while holding its lock stops the process.)
    drop(held); // the compaction thread, woken by the stalled write, catches up
    assert!(waited, "a write past the stop threshold waits");
    assert_eq!(level, 2, "stalled");
    read.unwrap();
    assert_eq!(page, [4; 512]);
    writer.join().unwrap().unwrap();
    assert_eq!(policy.pace(&s.debt()), Pace::Free, "{:?}", s.debt());
    s.read(None, 512, &mut page).unwrap();
    assert_eq!(page, [5; 512]);
    s.write(None, 1024, &[6; 512]).unwrap();
    assert_eq!(s.pace_level.load(Ordering::Acquire), 0, "no longer paced");
    b.shutdown();
}
}
