//! The collector's benchmark (docs/PERFORMANCE.md, *Garbage collector*): a prefix on a fresh
//! local SeaweedFS with `BLOBS` blobs, `GARBAGE_PERCENT` % of them unreferenced, spread over
//! `IMAGES` images; then two passes with prompt thresholds (count 1, days 0): the first
//! deletes the garbage, the second finds nothing to do. Prints time and requests per pass.
//! SeaweedFS runs in a temp directory removed at the end.
//!
//!     cargo run --release -p mvps-s3-gc --example bench_pass [BLOBS]

use mvps::catalog::manifest::{writer_id_hex, LayerRef, Manifest, Newest, MANIFEST_FORMAT_VERSION};
use mvps::catalog::{keys, publish_next, Conflict, Edit, Outcome};
use mvps::s3::testing::SeaweedFs;
use mvps::s3::S3Store;
use mvps::store::ImageStore;
use mvps_s3_gc::pass::{self, parallel};
use mvps_s3_gc::plan::Policy;
use std::time::Instant;

const BLOBS: usize = 100_000;
const GARBAGE_PERCENT: usize = 10;
const IMAGES: usize = 100;
const UPLOADERS: usize = 32;

fn main() {
    let blobs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("BLOBS: a number"))
        .unwrap_or(BLOBS);
    let weed = SeaweedFs::start();
    let bucket = weed.fresh_bucket();
    let store = S3Store::open(weed.config(&bucket, "bench/")).unwrap();

    let started = Instant::now();
    let ids: Vec<String> = (0..blobs).map(|_| keys::new_blob_id()).collect();
    parallel(&ids, UPLOADERS, |id| {
        store.put(&keys::blob_key(id), b"x").unwrap()
    });
    let garbage = blobs * GARBAGE_PERCENT / 100;
    let live = &ids[garbage..];
    let per_image = live.len().div_ceil(IMAGES);
    for (i, chunk) in live.chunks(per_image).enumerate() {
        let m = Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            image_id: format!("bench{i}.mvps-image"),
            generation: 0,
            change_count: 1,
            writer_id: writer_id_hex(1),
            page_size_bits: 12,
            layers: chunk
                .iter()
                .map(|id| LayerRef {
                    blob_id: id.clone(),
                    size_bytes: 1,
                    data_pages: 1,
                })
                .collect(),
            created_at_unix: 0,
        };
        let base = Newest {
            manifest: None,
            cut_short: Vec::new(),
            taken_generation: 0,
        };
        let o = publish_next(&store, &base, &Edit::Whole(m), Conflict::Fence).unwrap();
        assert!(matches!(o, Outcome::Published(_)), "{o:?}");
    }
    eprintln!(
        "populated {blobs} blobs ({garbage} garbage) and {IMAGES} manifests in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let policy = Policy {
        manifest_retention_secs: 0,
        inactive_days: 0,
        inactive_count: 1,
        // The blobs were just written; the bound is tested elsewhere.
        min_blob_age_ms: 0,
    };
    for n in 1..=2 {
        let s = pass::run(&store, &policy, 32, false).unwrap();
        println!("pass {n}: {}", s.line());
    }
    let left = store.list("blobs/", None).unwrap().len();
    assert_eq!(left, blobs - garbage, "the garbage went, nothing else");
}
