//! mvps-s3-gc: the garbage collector of an mvps image store (DESIGN §8, docs/FORMAT.md
//! *Garbage collection*). One run is one pass: list, plan ([`plan`], pure), execute
//! ([`pass`]). It works on an S3 prefix or on a local image store directory.

pub mod pass;
pub mod plan;

use argh::FromArgs;
use serde::Serialize;

/// mvps-s3-gc: deletes old manifests and blobs no image references from an mvps image store
/// (an S3 bucket prefix, or a local image store directory). One run is one pass; run it
/// from a timer.
///
/// Every flag may also be set through an environment variable MVPS_S3_GC_<FLAG>, e.g.
/// MVPS_S3_GC_BUCKET=mvps-image-store. S3 credentials come from AWS_ACCESS_KEY_ID,
/// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION and S3_ENDPOINT.
#[derive(FromArgs, Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// S3 bucket of the image store (no default; this or --image-store-local-path)
    #[argh(option)]
    pub bucket: Option<String>,

    /// key prefix of the image store in the bucket, e.g. test/ (default: none, the bucket's
    /// root)
    #[argh(option, default = "String::new()")]
    pub prefix: String,

    /// collect the local image store in this directory instead of S3 (no default)
    #[argh(option)]
    pub image_store_local_path: Option<String>,

    /// requests in flight at once: reads, mark writes, delete batches (default 32)
    #[argh(option, default = "32")]
    pub concurrency: usize,

    /// days a blob must have been found unreferenced before it is deleted (default 7)
    #[argh(option, default = "7")]
    pub threshold_inactive_days: u64,

    /// passes that must have found a blob unreferenced before it is deleted (default 3)
    #[argh(option, default = "3")]
    pub threshold_inactive_count: u32,

    /// keep manifests superseded less than this long ago: seconds, or with a unit s, m, h,
    /// d (default 15m)
    #[argh(option, default = "String::from(\"15m\")")]
    pub manifest_retention: String,

    /// print what the pass would do; change nothing
    #[argh(switch)]
    pub dry_run: bool,

    /// also print the summary as one JSON object on stdout
    #[argh(switch)]
    pub json: bool,

    /// error, warn, info, debug or trace (default info)
    #[argh(option, default = "String::from(\"info\")")]
    pub log_level: String,
}

/// The flags (and whether each takes a value), for the `MVPS_S3_GC_*` environment merge.
pub const FLAGS: &[(&str, bool)] = &[
    ("bucket", true),
    ("prefix", true),
    ("image-store-local-path", true),
    ("concurrency", true),
    ("threshold-inactive-days", true),
    ("threshold-inactive-count", true),
    ("manifest-retention", true),
    ("dry-run", false),
    ("json", false),
    ("log-level", true),
];

/// Prefix of the environment variables that set flags.
pub const ENV_PREFIX: &str = "MVPS_S3_GC_";

/// Most requests in flight that `--concurrency` may ask for.
pub const CONCURRENCY_MAX: usize = 256;

/// Exit status: the pass ran (or planned, with --dry-run) completely.
pub const EXIT_OK: i32 = 0;
/// Exit status: bad configuration, or some deletes failed (what failed is logged).
pub const EXIT_ERROR: i32 = 1;
/// Exit status: a sanity stop (or a refused command line); nothing was deleted.
pub const EXIT_STOP: i32 = 2;

/// What one run did: printed as one line, and with `--json` as one JSON object.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub store: String,
    pub dry_run: bool,
    pub manifests_kept: u64,
    pub manifests_deleted: u64,
    pub blobs_referenced: u64,
    pub blobs_marked: u64,
    pub blobs_deleted: u64,
    pub bytes_freed: u64,
    pub marks_deleted: u64,
    pub uploads_aborted: u64,
    /// Objects under our prefixes whose keys are not ours: never touched.
    pub foreign_keys: u64,
    /// Deletes, writes or aborts that failed (the pass is then exit status 1).
    pub errors: u64,
    /// HTTP requests sent (S3 only).
    pub requests: Option<u64>,
    pub seconds: f64,
}

impl Summary {
    pub fn line(&self) -> String {
        format!(
            "mvps-s3-gc{}: {}: manifests kept {}, deleted {}; blobs referenced {}, marked {}, \
             deleted {} ({} bytes freed); uploads aborted {}; errors {}; {}{:.2} s",
            if self.dry_run { " (dry run)" } else { "" },
            self.store,
            self.manifests_kept,
            self.manifests_deleted,
            self.blobs_referenced,
            self.blobs_marked,
            self.blobs_deleted,
            self.bytes_freed,
            self.uploads_aborted,
            self.errors,
            self.requests
                .map(|r| format!("{r} requests, "))
                .unwrap_or_default(),
            self.seconds
        )
    }
}

/// The policy the options ask for (the minimum blob age is fixed: `catalog::min_blob_age`).
pub fn policy(o: &Options) -> Result<plan::Policy, String> {
    let retention = mvps::config::parse_duration_secs(&o.manifest_retention)
        .map_err(|e| format!("--manifest-retention: {e}"))?;
    if !(1..=CONCURRENCY_MAX).contains(&o.concurrency) {
        return Err(format!(
            "--concurrency {}: use 1 to {CONCURRENCY_MAX}",
            o.concurrency
        ));
    }
    Ok(plan::Policy {
        manifest_retention_secs: retention,
        inactive_days: o.threshold_inactive_days,
        // A blob is always seen once by the pass that deletes it.
        inactive_count: o.threshold_inactive_count.max(1),
        min_blob_age_ms: mvps::catalog::min_blob_age().as_millis() as u64,
    })
}
