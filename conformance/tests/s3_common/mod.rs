//! Shared by the `s3_*` suites: a real SeaweedFS (one per test process, shared by its tests
//! through `mvps::s3::testing::shared`), a fresh bucket per test, `mvps-te` processes on it,
//! and direct reads of the manifests they write.
#![allow(dead_code)] // each suite uses a different part

use mvps::engine::manifest::{self, Manifest};
use mvps::s3::testing::{self, SeaweedFs};
use mvps::s3::S3Store;
use mvps_conformance::server::{Builder, Server};
use mvps_conformance::tools::wait_for;
use std::sync::Arc;
use std::time::Duration;

/// Key prefix every suite uses inside its bucket (not the bucket root, which catches
/// prefix-handling bugs).
pub const PREFIX: &str = "mvps-conf/";

/// Checkpoint flags that make data move to S3 layers within a fraction of a second.
pub const FAST_CHECKPOINTS: [&str; 4] = [
    "--checkpoint-interval-ms",
    "200",
    "--checkpoint-interval-jitter-ms",
    "0",
];

/// A bucket on a running SeaweedFS.
pub struct S3 {
    pub weed: Arc<SeaweedFs>,
    pub bucket: String,
    /// `S3_ENDPOINT` given to servers: SeaweedFS itself, or a proxy in front of it.
    pub endpoint: String,
}

impl S3 {
    /// A fresh bucket on this process's SeaweedFS (started on first use).
    pub fn new() -> S3 {
        let weed = testing::shared();
        let bucket = weed.fresh_bucket();
        let endpoint = weed.endpoint().to_string();
        S3 {
            weed,
            bucket,
            endpoint,
        }
    }

    /// The environment an `mvps-te` on this bucket needs (credentials, region, endpoint).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.weed.env();
        for (k, v) in env.iter_mut() {
            if *k == "S3_ENDPOINT" {
                *v = self.endpoint.clone();
            }
        }
        env
    }

    /// An `mvps-te` builder using this bucket as its image store (its own, fresh, buffer store
    /// in the server's temp dir).
    pub fn server(&self) -> Builder {
        let mut b = Server::builder().args([
            "--image-store",
            "s3",
            "--image-store-s3-bucket",
            &self.bucket,
            "--image-store-s3-prefix",
            PREFIX,
        ]);
        for (k, v) in self.env() {
            b = b.env(k, &v);
        }
        b
    }

    /// A server with fast checkpoints and `extra` flags.
    #[track_caller]
    pub fn start(&self, extra: &[&str]) -> Server {
        self.server()
            .args(FAST_CHECKPOINTS)
            .args(extra.iter().copied())
            .start()
    }

    /// A direct client of the bucket (not through any proxy).
    pub fn store(&self) -> S3Store {
        S3Store::open(self.weed.config(&self.bucket, PREFIX)).expect("opening the S3 store")
    }

    /// The newest manifest of `image_id`, read straight from the bucket.
    pub fn manifest(&self, image_id: &str) -> Option<Manifest> {
        manifest::load_latest(&self.store(), image_id)
            .unwrap_or_else(|e| panic!("reading the manifest of {image_id}: {e}"))
    }

    /// Waits until the newest manifest of `image_id` has folded in at least `changes`
    /// committed changes; returns it.
    #[track_caller]
    pub fn wait_for_changes(&self, image_id: &str, changes: u64, timeout: Duration) -> Manifest {
        let what = format!("a manifest of {image_id} with change count {changes}");
        wait_for(&what, timeout, || {
            self.manifest(image_id)
                .filter(|m| m.change_count >= changes)
        })
    }

    /// Number of objects under `prefix` (relative to [`PREFIX`]).
    pub fn count(&self, prefix: &str) -> usize {
        mvps::store::ImageStore::list(&self.store(), prefix, None)
            .expect("listing the bucket")
            .len()
    }
}

/// Waits until `s` has checkpointed everything of `image_id` and closed it as idle (the
/// session closes only when no client is connected and its buffer is empty): from then on the
/// image's data is entirely in S3. `closes_before` is the count of such closes seen before.
#[track_caller]
pub fn wait_idle_closed(s: &Server, image_id: &str, closes_before: usize) {
    wait_for(
        &format!("{image_id} checkpointed and closed"),
        Duration::from_secs(60),
        || (idle_closes(s, image_id) > closes_before).then_some(()),
    );
}

/// How many times `s` (this run) has logged closing `image_id` as idle.
pub fn idle_closes(s: &Server, image_id: &str) -> usize {
    let needle = format!("image {image_id}: idle, closed");
    s.log().matches(&needle).count()
}

/// The number of writes fio issued (`issued rwts: total=R,W,T,…`), summed over its output.
pub fn fio_writes(fio_output: &str) -> u64 {
    fio_output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("issued rwts: total="))
        .map(|rest| {
            let w = rest
                .split(',')
                .nth(1)
                .expect("issued rwts has a write count");
            w.trim().parse::<u64>().expect("write count is a number")
        })
        .sum()
}
