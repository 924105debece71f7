//! The server with `--image-store s3` against a real S3 (SeaweedFS, started through
//! `mvps::s3::testing`, a fresh bucket per test): checkpoints land in the bucket, and after
//! SIGKILL plus the loss of the buffer store, a restarted server reads everything back from
//! S3 — small unaligned writes through qemu-io and the raw client, and a 64 MiB random file
//! through nbdcopy with four connections. Wrong credentials or a missing bucket stop the
//! server at start-up. Guards the S3 path end to end (DESIGN §1: tests run the same suites
//! against both stores).

use mvps::s3::testing::{self, SeaweedFs};
use mvps::s3::S3Store;
use mvps::store::ImageStore;
use mvps_conformance::manifest;
use mvps_conformance::server::{base_command, free_port, Server};
use mvps_conformance::token::{self, SECRET};
use mvps_conformance::tools::{cmd, heavy, pattern, run};
use std::sync::Arc;
use std::time::Duration;

const PREFIX: &str = "conformance/";

struct S3 {
    weed: Arc<SeaweedFs>,
    bucket: String,
}

impl S3 {
    fn new() -> S3 {
        let weed = testing::shared();
        let bucket = weed.fresh_bucket();
        S3 { weed, bucket }
    }

    fn server(&self) -> Server {
        let mut b = Server::builder().args([
            "--image-store",
            "s3",
            "--image-store-s3-bucket",
            &self.bucket,
            "--image-store-s3-prefix",
            PREFIX,
            "--checkpoint-interval-ms",
            "200",
            "--checkpoint-interval-jitter-ms",
            "0",
        ]);
        for (k, v) in self.weed.env() {
            b = b.env(k, &v);
        }
        b.start()
    }

    fn store(&self) -> S3Store {
        S3Store::open(self.weed.config(&self.bucket, PREFIX)).expect("opening the S3 store")
    }

    /// The newest manifest of an image in the bucket, parsed.
    fn newest_manifest(&self, image_id: &str) -> Option<serde_json::Value> {
        let store = self.store();
        let listed = store
            .list(&format!("images/{image_id}/"), None)
            .expect("LIST");
        let mut keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
        keys.retain(|k| k.ends_with(".json"));
        keys.sort(); // the newest generation sorts first
        serde_json::from_slice(&store.get(keys.first()?).expect("GET manifest")).ok()
    }

    /// Waits until the newest manifest in the bucket holds `pages` data pages (each page
    /// was written once, so all of them are checkpointed).
    fn wait_checkpointed(&self, image_id: &str, pages: u64) {
        manifest::wait_for_pages(pages, Duration::from_secs(120), || {
            self.newest_manifest(image_id)
        });
    }
}

fn lose_buffer_store_and_restart(s: &mut Server) {
    s.kill9();
    std::fs::remove_dir_all(s.buffer_store()).expect("removing the buffer store");
    s.restart();
}

#[test]
fn s3_checkpointed_data_survives_losing_the_buffer_store() {
    let s3 = S3::new();
    let mut s = s3.server();
    let id = token::image_id("s3-small");
    let tok = token::token(&id, 64 << 20);
    let qemu_io = |s: &Server, c: &str| {
        run(
            &mut cmd("qemu-io", ["--image-opts", &s.qemu_opts(&tok), "-c", c]),
            Duration::from_secs(120),
        )
        .ok()
    };
    qemu_io(&s, "write -P 0xab 0 64k");
    let odd = pattern(70, 12_345);
    let mut c = s.open(&tok);
    c.write(10_000_001, &odd).unwrap();
    c.flush().unwrap();
    drop(c);
    s3.wait_checkpointed(&id, 16 + 4); // 64 KiB at 0; 12 345 bytes at 10 000 001
    assert!(
        !s.image_store().join("images").exists(),
        "the local image store was used"
    );

    lose_buffer_store_and_restart(&mut s);
    let out = qemu_io(&s, "read -P 0xab 0 64k");
    assert!(!out.stdout.contains("verification failed"), "{out}");
    let mut c = s.open(&tok);
    assert!(
        c.read(10_000_001, odd.len() as u32) == Ok(odd),
        "S3-backed data lost"
    );
    assert_eq!(c.read(65_536, 4096), Ok(vec![0; 4096]));
}

#[test]
fn s3_nbdcopy_round_trip_after_losing_the_buffer_store() {
    let _h = heavy();
    let s3 = S3::new();
    let mut s = s3.server();
    let id = token::image_id("s3-copy");
    let tok = token::token(&id, 64 << 20);
    let (src, dst) = (s.dir().join("src.bin"), s.dir().join("dst.bin"));
    std::fs::write(&src, pattern(71, 64 << 20)).unwrap();
    let t = Duration::from_secs(600);
    let uri = s.uri(&tok);
    run(
        &mut cmd(
            "nbdcopy",
            ["--connections=4", "--flush", src.to_str().unwrap(), &uri],
        ),
        t,
    )
    .ok();
    s3.wait_checkpointed(&id, 16384);

    lose_buffer_store_and_restart(&mut s);
    let uri = s.uri(&tok);
    run(
        &mut cmd("nbdcopy", ["--connections=4", &uri, dst.to_str().unwrap()]),
        t,
    )
    .ok();
    run(&mut cmd("cmp", [&src, &dst]), t).ok();
}

#[test]
fn s3_bad_credentials_or_missing_bucket_stop_the_server_at_start_up() {
    let s3 = S3::new();
    let dir = tempfile::tempdir().unwrap();
    let start = |bucket: &str, secret_key: &str| {
        let mut c = base_command(Some(SECRET));
        c.envs(s3.weed.env())
            .env("AWS_SECRET_ACCESS_KEY", secret_key);
        c.args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--image-store",
            "s3",
        ]);
        c.args(["--image-store-s3-bucket", bucket, "--data-dir"])
            .arg(dir.path());
        run(&mut c, Duration::from_secs(120))
    };
    let out = start(&s3.bucket, "wrong-secret").fails();
    assert!(!out.stderr.trim().is_empty(), "no message: {out}");
    assert!(
        !out.all().contains("wrong-secret"),
        "the secret key is logged: {out}"
    );
    let out = start("mvps-no-such-bucket", testing::SECRET_ACCESS_KEY).fails();
    assert!(
        out.all().contains("mvps-no-such-bucket"),
        "message does not name the bucket: {out}"
    );
}
