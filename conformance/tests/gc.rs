//! mvps-s3-gc end to end (docs/FORMAT.md, *Garbage collection*), on a real SeaweedFS and on
//! the local image store: the real binary against stores written by real `mvps-te`
//! processes. Both programs get `MVPS_MIN_BLOB_AGE_SECS` so that the minimum blob age is
//! seconds, not minutes.

mod s3_common;

use mvps::catalog::gcmark::PassRecord;
use mvps::catalog::keys;
use mvps::catalog::manifest::{self, Manifest};
use mvps::catalog::{publish_next, Conflict, Edit, Outcome};
use mvps::store::local::LocalStore;
use mvps::store::ImageStore;
use mvps_conformance::faultproxy::FaultProxy;
use mvps_conformance::server::{Builder, Server};
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, pattern, run, wait_for, Output};
use s3_common::{wait_idle_closed, FAST_CHECKPOINTS, PREFIX, S3};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// The minimum blob age both programs use here.
const MIN_AGE_SECS: u64 = 4;
const MIN_AGE: Duration = Duration::from_secs(MIN_AGE_SECS);
const T: Duration = Duration::from_secs(180);
const SIZE: u64 = 4 << 20;
const PAGE: usize = 4096;
/// NBD_EIO.
const EIO: u32 = 5;
/// Collect as soon as the bound allows: one pass, no waiting days, only the newest manifest.
const PROMPT: [&str; 6] = [
    "--threshold-inactive-days",
    "0",
    "--threshold-inactive-count",
    "1",
    "--manifest-retention",
    "0s",
];

/// An image store under test: a local directory or a SeaweedFS bucket prefix.
enum Target {
    Local(tempfile::TempDir),
    S3(S3),
}

impl Target {
    fn local() -> Target {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("image-store")).unwrap();
        Target::Local(d)
    }

    fn s3() -> Target {
        Target::S3(S3::new())
    }

    fn local_dir(&self) -> Option<PathBuf> {
        match self {
            Target::Local(d) => Some(d.path().join("image-store")),
            Target::S3(_) => None,
        }
    }

    fn store(&self) -> Box<dyn ImageStore> {
        match self {
            Target::Local(_) => Box::new(LocalStore::open(&self.local_dir().unwrap()).unwrap()),
            Target::S3(s3) => Box::new(s3.store()),
        }
    }

    /// An `mvps-te` on this store with a fresh buffer store and fast checkpoints.
    fn server(&self) -> Server {
        let b: Builder = match self {
            Target::Local(_) => Server::builder().args([
                "--image-store-local-path".to_string(),
                self.local_dir().unwrap().display().to_string(),
            ]),
            Target::S3(s3) => s3.server(),
        };
        b.env(mvps::catalog::MIN_BLOB_AGE_ENV, &MIN_AGE_SECS.to_string())
            .args(FAST_CHECKPOINTS)
            .start()
    }

    /// One `mvps-s3-gc` run with `args` after the store's own flags.
    fn gc_with_endpoint(&self, endpoint: Option<&str>, args: &[&str]) -> Gc {
        let mut c = cmd(
            mvps_conformance::bins::bin("mvps-s3-gc").to_str().unwrap(),
            args,
        );
        c.env(mvps::catalog::MIN_BLOB_AGE_ENV, MIN_AGE_SECS.to_string());
        match self {
            Target::Local(_) => {
                c.arg("--image-store-local-path")
                    .arg(self.local_dir().unwrap());
            }
            Target::S3(s3) => {
                c.args(["--bucket", &s3.bucket, "--prefix", PREFIX]);
                for (k, v) in s3.env() {
                    c.env(k, v);
                }
                if let Some(e) = endpoint {
                    c.env("S3_ENDPOINT", e);
                }
            }
        }
        c.arg("--json");
        Gc::from(run(&mut c, T))
    }

    fn gc(&self, args: &[&str]) -> Gc {
        self.gc_with_endpoint(None, args)
    }

    /// Every key under `prefix`.
    fn keys(&self, prefix: &str) -> BTreeSet<String> {
        self.store()
            .list(prefix, None)
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    }

    fn all_keys(&self) -> BTreeSet<String> {
        let mut all = self.keys("images/");
        all.extend(self.keys("blobs/"));
        all.extend(self.keys("gcmark/"));
        all
    }
}

/// The outcome of one collector run.
struct Gc {
    out: Output,
    code: i32,
    /// The summary (or the stop), the last line of stdout.
    json: Value,
}

impl From<Output> for Gc {
    fn from(out: Output) -> Gc {
        let code = out.status.code().unwrap_or(-1);
        let json = out
            .stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        Gc { out, code, json }
    }
}

impl Gc {
    #[track_caller]
    fn ok(self) -> Gc {
        assert_eq!(self.code, 0, "mvps-s3-gc failed:\n{}", self.out);
        self
    }

    fn n(&self, field: &str) -> u64 {
        self.json[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no {field} in {}\n{}", self.json, self.out))
    }

    /// A sanity stop: exit status 2, a message on stderr naming `what`.
    #[track_caller]
    fn stopped(self, what: &str) -> Gc {
        assert_eq!(self.code, 2, "expected a sanity stop:\n{}", self.out);
        assert!(
            self.out.stderr.contains(what),
            "{what:?} not said:\n{}",
            self.out
        );
        assert!(
            self.out.stderr.contains("nothing deleted")
                || self.out.stderr.contains("Nothing deleted"),
            "{}",
            self.out
        );
        self
    }
}

/// The newest manifest of an image, and the blob ids it names.
fn newest(t: &Target, image_id: &str) -> (Manifest, BTreeSet<String>) {
    let m = manifest::load_latest(t.store().as_ref(), image_id)
        .unwrap()
        .expect("a manifest");
    let ids = m.layers.iter().map(|l| l.blob_id.clone()).collect();
    (m, ids)
}

fn blob_ids(t: &Target) -> BTreeSet<String> {
    t.keys("blobs/")
        .iter()
        .filter_map(|k| keys::parse_blob_key(k).map(str::to_string))
        .collect()
}

fn mark_keys(t: &Target) -> BTreeSet<String> {
    t.keys("gcmark/")
        .into_iter()
        .filter(|k| k != keys::GC_PASS_KEY)
        .collect()
}

/// Writes `rounds` bursts of 16 KiB writes at pseudo-random page offsets in the first
/// `region` bytes, each burst flushed and followed by a pause long enough for a checkpoint:
/// many manifests, layers merged by compaction, superseded blobs. Returns the image's bytes.
fn churn(s: &Server, tok: &str, region: usize, rounds: u64) -> Vec<u8> {
    let mut model = vec![0u8; region];
    let mut c = s.open(tok);
    let pages = (region / PAGE) as u64;
    for r in 0..rounds {
        for i in 0..8u64 {
            let data = pattern(r * 100 + i, 4 * PAGE);
            let page = (r * 7919 + i * 104_729) % (pages - 4);
            let off = page as usize * PAGE;
            c.write(off as u64, &data).unwrap();
            model[off..off + data.len()].copy_from_slice(&data);
        }
        c.flush().unwrap();
        std::thread::sleep(Duration::from_millis(250));
    }
    c.disconnect();
    model
}

fn read_all(s: &Server, tok: &str, len: usize) -> Vec<u8> {
    let mut c = s.open(tok);
    let mut out = Vec::with_capacity(len);
    for off in (0..len).step_by(1 << 20) {
        let n = (len - off).min(1 << 20) as u32;
        out.extend(c.read(off as u64, n).unwrap());
    }
    out
}

/// Churn, stop, then passes: old manifests go at once (retention 0s), dead blobs only at the
/// second pass (count 2), a third pass has nothing left to do; the image then reads back
/// byte-identical through a fresh buffer store.
fn churn_then_collect(t: &Target) {
    let id = token::image_id("gc-churn");
    let tok = token::token(&id, SIZE);
    let mut a = t.server();
    let model = churn(&a, &tok, 2 << 20, 24);
    wait_idle_closed(&a, &id, 0);
    a.terminate();
    let manifests = t.keys(&keys::manifest_prefix(&id)).len() as u64;
    let (m, live) = newest(t, &id);
    let blobs = blob_ids(t);
    let dead: BTreeSet<String> = blobs.difference(&live).cloned().collect();
    assert!(manifests >= 5, "{manifests} manifests: not enough churn");
    assert!(
        !dead.is_empty(),
        "no superseded blob: compaction did not run? {m:?}"
    );
    assert!(live.is_subset(&blobs));
    std::thread::sleep(MIN_AGE + Duration::from_millis(500));

    let args = with_count("2");
    let first = t.gc(&args).ok();
    assert_eq!(first.n("manifests_deleted"), manifests - 1, "{}", first.out);
    assert_eq!(first.n("manifests_kept"), 1);
    assert_eq!(
        first.n("blobs_deleted"),
        0,
        "count 2: the first pass only marks"
    );
    assert_eq!(first.n("blobs_marked"), dead.len() as u64);
    assert_eq!(first.n("blobs_referenced"), live.len() as u64);
    assert_eq!(
        t.keys(&keys::manifest_prefix(&id)),
        BTreeSet::from([m.key()])
    );
    let marked: BTreeSet<String> = dead.iter().map(|b| keys::gcmark_key(b)).collect();
    assert_eq!(mark_keys(t), marked);
    assert_eq!(blob_ids(t), blobs, "nothing deleted at the first sighting");

    let second = t.gc(&args).ok();
    assert_eq!(
        second.n("blobs_deleted"),
        dead.len() as u64,
        "{}",
        second.out
    );
    assert!(second.n("bytes_freed") > 0);
    assert_eq!(blob_ids(t), live, "exactly the live blobs remain");
    assert!(mark_keys(t).is_empty(), "marks of deleted blobs go too");

    let third = t.gc(&args).ok();
    for f in [
        "manifests_deleted",
        "blobs_deleted",
        "blobs_marked",
        "errors",
    ] {
        assert_eq!(third.n(f), 0, "{f}: {}", third.out);
    }
    assert!(
        third.out.stdout.contains("manifests kept 1"),
        "{}",
        third.out
    );

    let b = t.server();
    assert!(
        read_all(&b, &tok, model.len()) == model,
        "image differs after collection"
    );
}

#[test]
fn churned_image_collected_on_the_local_store() {
    churn_then_collect(&Target::local());
}

#[test]
fn churned_image_collected_on_s3() {
    churn_then_collect(&Target::s3());
}

/// A writer fenced by a takeover, whose next generation the collector has deleted (the
/// takeover manifest is old, so only the newest is kept): its conditional create of that
/// generation succeeds, but it finds the newer manifest, stays fenced, and its writes fail.
#[test]
fn a_fenced_writer_whose_generation_was_collected_stays_fenced() {
    let t = Target::local();
    let id = token::image_id("gc-fenced");
    let tok = token::token(&id, SIZE);
    let a = t.server();
    let mut ca = a.open(&tok);
    ca.write(0, &pattern(1, 8192)).unwrap();
    ca.flush().unwrap();
    let g = wait_for("A's checkpoint", T, || {
        manifest::load_latest(t.store().as_ref(), &id)
            .unwrap()
            .filter(|m| m.change_count >= 1)
    })
    .generation;

    // B takes over (generation g+1) and checkpoints above it.
    let b = t.server();
    let mut cb = b.open(&tok);
    let mine = pattern(2, 8192);
    cb.write(1 << 20, &mine).unwrap();
    cb.flush().unwrap();
    wait_for("B's checkpoint", T, || {
        manifest::load_latest(t.store().as_ref(), &id)
            .unwrap()
            .filter(|m| m.generation > g + 1)
    });
    let out = t.gc(&PROMPT).ok();
    assert!(out.n("manifests_deleted") >= 2, "{}", out.out);
    let takeover_key = keys::manifest_key(&id, g + 1);
    assert!(
        !t.keys("images/").contains(&takeover_key),
        "generation g+1 collected"
    );

    // A does not know: its next checkpoint creates g+1, finds B's newer manifest, is fenced.
    assert_eq!(ca.write(2 << 20, &pattern(3, 4096)), Ok(()));
    wait_for("A to log that it is fenced", T, || {
        a.log().contains(": fenced: generation").then_some(())
    });
    assert!(
        a.log().contains("another writer owns the image"),
        "{}",
        a.log_tail()
    );
    assert_eq!(ca.write(0, &[7; 4096]), Err(EIO));
    assert_eq!(ca.write(3 << 20, &[8; 4096]), Err(EIO), "still fenced");
    // B still owns the image and sees none of A's late writes.
    assert_eq!(cb.read(2 << 20, 4096), Ok(vec![0; 4096]));
    assert_eq!(cb.read(1 << 20, 8192), Ok(mine));
    let (newest, _) = newest(&t, &id);
    let b_writer = newest.writer_id.clone();
    cb.write(0, &pattern(4, 4096)).unwrap();
    cb.flush().unwrap();
    wait_for("B's next checkpoint", T, || {
        let (m, _) = self::newest(&t, &id);
        (m.generation > newest.generation).then_some(())
    });
    assert_eq!(self::newest(&t, &id).0.writer_id, b_writer);
}

/// An image written straight into the store (two layers), a second manifest that drops one
/// of them, and `garbage` unreferenced blobs. Returns the newest manifest.
fn seed(t: &Target, image: &str, garbage: usize) -> Manifest {
    seed_store(t.store().as_ref(), image, garbage)
}

fn seed_store(store: &dyn ImageStore, image: &str, garbage: usize) -> Manifest {
    let tmp = tempfile::tempdir().unwrap();
    let m1 =
        mvps::engine::testing::write_image(store, tmp.path(), image, 12, &[(0, 4), (2, 4)], |p| {
            p as u8
        });
    let drop = Edit::Drop(
        BTreeSet::from([m1.layers[0].blob_id.clone()])
            .into_iter()
            .collect(),
    );
    let m2 = match publish_next(store, &manifest::Newest::of(m1), &drop, Conflict::Fence).unwrap() {
        Outcome::Published(m) => m,
        other => panic!("{other:?}"),
    };
    for _ in 0..garbage {
        store
            .put(&keys::blob_key(&keys::new_blob_id()), b"garbage")
            .unwrap();
    }
    m2
}

/// [`PROMPT`] with another pass count.
fn with_count(n: &'static str) -> [&'static str; 6] {
    let mut a = PROMPT;
    a[3] = n;
    a
}

/// Runs a pass that must stop (see [`Gc::stopped`]) and checks that the store is unchanged.
fn assert_stops(t: &Target, what: &str) -> Gc {
    std::thread::sleep(MIN_AGE);
    let before = t.all_keys();
    let g = t.gc(&PROMPT).stopped(what);
    assert_eq!(t.all_keys(), before, "a sanity stop changed the store");
    g
}

/// Each crafted sanity stop: exit status 2, nothing deleted, a message saying what to check.
#[test]
fn sanity_stops_delete_nothing() {
    // Blobs but no manifests.
    let t = Target::local();
    let blob = keys::blob_key(&keys::new_blob_id());
    t.store().put(&blob, b"x").unwrap();
    assert_stops(&t, "no manifest under images/");

    // A kept manifest naming a missing blob: corruption, said loudly.
    let t = Target::local();
    let m = seed(&t, "s.mvps-image", 2);
    let lost = &m.layers[0].blob_id;
    t.store().delete(&keys::blob_key(lost)).unwrap();
    let g = assert_stops(&t, "CORRUPTION");
    assert!(g.out.stderr.contains(lost.as_str()), "{}", g.out);

    // A damaged newest manifest: never read as "references nothing".
    let t = Target::local();
    let m = seed(&t, "s.mvps-image", 2);
    let key = keys::manifest_key("s.mvps-image", m.generation + 1);
    let damaged = b"{\"format_version\": 1,, }";
    t.store().create_if_absent(&key, damaged).unwrap();
    assert_stops(&t, "damaged");

    // Far fewer manifests than the previous pass kept.
    let t = Target::local();
    seed(&t, "s.mvps-image", 2);
    let record = PassRecord {
        format_version: 1,
        started_at: 1,
        manifests_kept: 50,
    };
    t.store()
        .put(keys::GC_PASS_KEY, &record.to_bytes())
        .unwrap();
    assert_stops(&t, keys::GC_PASS_KEY);

    // A listing error: wrong credentials on S3 (one line that names what to fix).
    let t = Target::s3();
    seed(&t, "s.mvps-image", 1);
    let before = t.all_keys();
    let Target::S3(s3) = &t else { unreachable!() };
    let mut c = cmd(
        mvps_conformance::bins::bin("mvps-s3-gc").to_str().unwrap(),
        ["--bucket", s3.bucket.as_str(), "--prefix", PREFIX],
    );
    for (k, v) in s3.env() {
        c.env(k, v);
    }
    c.env("AWS_SECRET_ACCESS_KEY", "wrong");
    let g = Gc::from(run(&mut c, T)).stopped("AWS_SECRET_ACCESS_KEY");
    assert_eq!(g.out.stderr.trim().lines().count(), 1, "{}", g.out);
    assert_eq!(t.all_keys(), before);
}

/// `--dry-run` deletes nothing (and says what it would); an empty prefix is a no-op; a
/// missing bucket gives one clear line and a non-zero exit.
#[test]
fn dry_run_empty_prefix_and_missing_bucket() {
    for t in [Target::local(), Target::s3()] {
        let m = seed(&t, "d.mvps-image", 3);
        std::thread::sleep(MIN_AGE + Duration::from_millis(300));
        let args = PROMPT;
        let before = t.all_keys();
        let mut dry = args.to_vec();
        dry.push("--dry-run");
        let g = t.gc(&dry).ok();
        assert_eq!(
            g.n("blobs_deleted"),
            4,
            "3 garbage blobs and the dropped layer: {}",
            g.out
        );
        assert_eq!(g.n("manifests_deleted"), 1);
        assert!(g.out.stdout.contains("would delete blob"), "{}", g.out);
        assert!(g.out.stdout.contains("(dry run)"), "{}", g.out);
        assert_eq!(t.all_keys(), before, "a dry run changed the store");
        let g = t.gc(&args).ok();
        assert_eq!(g.n("blobs_deleted"), 4);
        let live: BTreeSet<String> = m.layers.iter().map(|l| l.blob_id.clone()).collect();
        assert_eq!(blob_ids(&t), live);
    }
    for t in [Target::local(), Target::s3()] {
        let g = t.gc(&[]).ok();
        assert_eq!(
            g.n("manifests_kept") + g.n("blobs_deleted") + g.n("blobs_referenced"),
            0
        );
        assert!(t.all_keys().is_empty(), "an empty prefix stays empty");
    }
    let s3 = S3::new();
    let mut c = cmd(
        mvps_conformance::bins::bin("mvps-s3-gc").to_str().unwrap(),
        ["--bucket", "no-such-bucket-mvps"],
    );
    for (k, v) in s3.env() {
        c.env(k, v);
    }
    let out = run(&mut c, T);
    assert_ne!(out.status.code(), Some(0), "{out}");
    let line = out.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{out}");
    assert!(
        line.contains("no-such-bucket-mvps") && line.contains("does not exist"),
        "{out}"
    );
}

/// Passes through a proxy failing 20% of the requests: whatever each pass manages, no blob
/// a newest manifest names is ever deleted; once the faults stop, the garbage goes.
#[test]
fn passes_through_a_fault_proxy_never_delete_a_referenced_blob() {
    let t = Target::s3();
    let Target::S3(s3) = &t else { unreachable!() };
    let images: Vec<(String, Manifest)> = (0..3)
        .map(|i| {
            let id = format!("f{i}.mvps-image");
            let m = seed(&t, &id, 40);
            (id, m)
        })
        .collect();
    let live: BTreeSet<String> = images
        .iter()
        .flat_map(|(_, m)| m.layers.iter().map(|l| l.blob_id.clone()))
        .collect();
    std::thread::sleep(MIN_AGE + Duration::from_millis(300));
    let proxy = FaultProxy::start(s3.weed.endpoint(), 0.2, 16);
    proxy.set_stall(Duration::from_millis(300));
    proxy.set_faults(true);
    let mut args = with_count("2").to_vec();
    args.extend(["--concurrency", "8"]);
    let mut codes = Vec::new();
    for _ in 0..4 {
        let g = t.gc_with_endpoint(Some(&proxy.endpoint()), &args);
        assert!([0, 1, 2].contains(&g.code), "{}", g.out);
        codes.push(g.code);
        let blobs = blob_ids(&t);
        assert!(
            live.is_subset(&blobs),
            "a referenced blob was deleted: {}",
            g.out
        );
        for (id, m) in &images {
            assert_eq!(newest(&t, id).0, *m, "the newest manifest changed");
        }
    }
    assert!(proxy.counts().failed() > 0, "the proxy failed nothing");
    proxy.set_faults(false);
    for _ in 0..2 {
        t.gc_with_endpoint(Some(&proxy.endpoint()), &args).ok();
    }
    assert_eq!(blob_ids(&t), live, "codes under faults: {codes:?}");
}

/// Passes in a tight loop (count 1, days 0) while one image takes sustained writes with
/// frequent checkpoints and compactions and a second image is taken over by a new buffer
/// store; afterwards both verify from a fresh buffer store.
#[test]
fn tight_loop_collection_during_writes_and_a_takeover() {
    let _h = mvps_conformance::tools::heavy();
    let t = Target::s3();
    let x = token::image_id("gc-loop-x");
    let y = token::image_id("gc-loop-y");
    let (tx, ty) = (token::token(&x, 16 << 20), token::token(&y, SIZE));
    let a = t.server();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let passes = std::sync::atomic::AtomicU64::new(0);
    let deleted = std::sync::atomic::AtomicU64::new(0);
    let model_y = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Retention 2s: a layer swapped out by a compaction may still be mid-read.
                let g = t.gc(&[
                    "--threshold-inactive-days",
                    "0",
                    "--threshold-inactive-count",
                    "1",
                    "--manifest-retention",
                    "2s",
                ]);
                assert_eq!(g.code, 0, "{}", g.out);
                passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                deleted.fetch_add(g.n("blobs_deleted"), std::sync::atomic::Ordering::Relaxed);
            }
        });
        // Y: written by A, then taken over by B, which writes more.
        let mut model = churn(&a, &ty, 1 << 20, 6);
        // Everything A wrote to Y is in the store before B takes Y over.
        wait_idle_closed(&a, &y, 0);
        let fio = s.spawn(|| fio(&a, &tx, &["--do_verify=1", "--rate_iops=,1000"]));
        let b = t.server();
        let mut cb = b.open(&ty);
        let more = pattern(99, 64 << 10);
        cb.write(512 << 10, &more).unwrap();
        cb.flush().unwrap();
        model[512 << 10..(512 << 10) + more.len()].copy_from_slice(&more);
        cb.disconnect();
        let out = fio.join().unwrap();
        assert!(
            out.status.success() && !out.all().contains("verify: bad"),
            "{out}"
        );
        wait_idle_closed(&b, &y, 0);
        wait_idle_closed(&a, &x, 0);
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        model
    });
    assert!(
        passes.load(std::sync::atomic::Ordering::Relaxed) >= 3,
        "too few passes ran"
    );
    assert!(
        deleted.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the passes deleted nothing: compaction garbage should have gone"
    );
    let c = t.server();
    let out = fio(&c, &tx, &["--verify_only"]);
    assert!(
        out.status.success() && !out.all().contains("verify: bad"),
        "{out}"
    );
    assert!(
        read_all(&c, &ty, model_y.len()) == model_y,
        "image Y differs"
    );
}

fn fio(s: &Server, tok: &str, extra: &[&str]) -> Output {
    let uri = format!("--uri={}", s.uri(tok));
    let mut c = cmd(
        "fio",
        ["--name=gc", "--ioengine=nbd", &uri, "--rw=randwrite"],
    );
    c.args([
        "--bs=4k",
        "--size=12M",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
    ]);
    c.args(["--randrepeat=1", "--randseed=77", "--verify_state_save=0"]);
    c.args(extra);
    run(&mut c, T)
}

/// The `cargo run -p mvps-s3-gc -- ARGS` lines of the README's garbage-collection section:
/// the ARGS of each (continuation lines joined).
fn readme_gc_commands() -> Vec<Vec<String>> {
    let readme =
        std::fs::read_to_string(mvps_conformance::bins::workspace_root().join("README.md"))
            .unwrap();
    let section = readme
        .split("\n## Garbage collection\n")
        .nth(1)
        .expect("README has a Garbage collection section");
    let section = section.split("\n## ").next().unwrap();
    let joined = section.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("cargo run -p mvps-s3-gc --"))
        .map(|args| args.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The README's commands work as written: on a bucket and prefix named as there (on this
/// test's SeaweedFS, whose endpoint and credentials replace the README's exports), and on a
/// local image store at the README's relative path. With `--threshold-inactive-days 0` and
/// the default count of 3 passes, the garbage goes at the third run (recent manifests stay
/// for the default retention window).
#[test]
fn readme_commands_work_as_written() {
    let commands = readme_gc_commands();
    assert_eq!(commands.len(), 2, "{commands:?}");
    let (s3_args, local_args) = (&commands[0], &commands[1]);
    assert!(s3_args.contains(&"--bucket".to_string()), "{s3_args:?}");
    let arg_after = |args: &[String], flag: &str| {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1].clone()
    };
    let weed = mvps::s3::testing::shared();
    let bucket = arg_after(s3_args, "--bucket");
    weed.create_bucket(&bucket).unwrap();
    let s3_store =
        mvps::s3::S3Store::open(weed.config(&bucket, &arg_after(s3_args, "--prefix"))).unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let local_dir = cwd
        .path()
        .join(arg_after(local_args, "--image-store-local-path"));
    std::fs::create_dir_all(&local_dir).unwrap();
    let local_store = LocalStore::open(&local_dir).unwrap();
    let stores: [(&dyn ImageStore, &Vec<String>); 2] =
        [(&s3_store, s3_args), (&local_store, local_args)];
    let seeded: Vec<Manifest> = stores
        .iter()
        .map(|(s, _)| seed_store(*s, "readme.mvps-image", 2))
        .collect();
    std::thread::sleep(MIN_AGE + Duration::from_millis(300));
    for ((store, args), m) in stores.iter().zip(&seeded) {
        for pass in 1..=3 {
            let mut c = cmd(
                mvps_conformance::bins::bin("mvps-s3-gc").to_str().unwrap(),
                args.iter(),
            );
            c.current_dir(cwd.path())
                .env(mvps::catalog::MIN_BLOB_AGE_ENV, MIN_AGE_SECS.to_string());
            for (k, v) in weed.env() {
                c.env(k, v);
            }
            let out = run(&mut c, T);
            assert!(out.status.success(), "{out}");
            let blobs = store.list("blobs/", None).unwrap().len();
            let manifests = store.list("images/", None).unwrap().len();
            // Both manifests are younger than the default retention (15 minutes), so the
            // layer only the older one names stays too; the 2 garbage blobs go at pass 3.
            assert_eq!(manifests, 2, "pass {pass}: {out}");
            let want = if pass < 3 {
                m.layers.len() + 3
            } else {
                m.layers.len() + 1
            };
            assert_eq!(blobs, want, "pass {pass}: {out}");
        }
    }
}
