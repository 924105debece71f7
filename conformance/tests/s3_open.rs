//! Opening an image on S3 is a handful of requests, and its layers open in parallel. An image
//! of eight layers is written straight into the bucket (layer blobs and a manifest, through
//! the library); an `mvps-te` reaches SeaweedFS through the fault proxy, which counts the
//! requests and, for this test, holds every request for one second. Opening the image (the
//! NBD handshake, which opens the session) must cost at most LIST + GET of the manifest, the
//! takeover manifest's PUT, the LIST confirming that it is the newest (docs/FORMAT.md,
//! *Garbage collection*) and one GET per layer, and must take far less than one second per
//! request; then every page of every layer reads back.

mod s3_common;

use mvps::engine::testing::write_image;
use mvps_conformance::faultproxy::{Fault, FaultProxy};
use mvps_conformance::token;
use s3_common::S3;
use std::time::{Duration, Instant};

const LAYERS: u64 = 8;
const PAGES_PER_LAYER: u64 = 16;
const STALL: Duration = Duration::from_secs(1);

fn page_byte(page: u64) -> u8 {
    (page * 7 % 251) as u8 + 1
}

#[test]
fn opening_an_image_is_a_handful_of_requests_and_layers_open_in_parallel() {
    let mut s3 = S3::new();
    let id = token::image_id("s3-open");
    let store = s3.store();
    let dir = tempfile::tempdir().unwrap();
    let layers: Vec<(u64, u64)> = (0..LAYERS)
        .map(|i| (i * PAGES_PER_LAYER * 2, PAGES_PER_LAYER))
        .collect();
    write_image(&store, dir.path(), &id, 12, &layers, page_byte);

    let proxy = FaultProxy::start(&s3.endpoint, 1.0, 7);
    proxy.set_kinds(&[Fault::Stall]);
    proxy.set_stall(STALL);
    s3.endpoint = proxy.endpoint();
    let s = s3.start(&[]);
    // The server opens its port before its start-up checks of the bucket (a probe PUT, a
    // conditional PUT, a DELETE) are done: wait for them, so that none is counted below.
    let ready = Instant::now() + Duration::from_secs(30);
    while !s.log().contains("listening on") {
        assert!(
            Instant::now() < ready,
            "mvps-te never logged that it listens"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let tok = token::token(&id, 1 << 20);
    let before = proxy.counts().total();
    proxy.set_faults(true);
    let t = Instant::now();
    let mut c = s.open(&tok);
    let took = t.elapsed();
    proxy.set_faults(false);
    let requests = proxy.counts().total() - before;
    eprintln!("opened an image of {LAYERS} layers: {requests} requests in {took:?}");
    assert!(
        (LAYERS..=LAYERS + 4).contains(&requests),
        "opening an image of {LAYERS} layers took {requests} requests"
    );
    // One after another, the requests would take (4 + LAYERS) stalls; in parallel, the
    // layers take about one.
    assert!(
        took < STALL * 7,
        "opening took {took:?}: were the layers opened one after another?"
    );
    assert!(
        took >= STALL * 3,
        "the proxy did not stall the requests ({took:?})"
    );
    for i in 0..LAYERS {
        let start = i * PAGES_PER_LAYER * 2;
        let got = c
            .read(start * 4096, (PAGES_PER_LAYER * 4096) as u32)
            .unwrap();
        for (j, p) in got.chunks(4096).enumerate() {
            assert!(
                p.iter().all(|&b| b == page_byte(start + j as u64)),
                "layer {i} page {j}"
            );
        }
        let gap = c.read((start + PAGES_PER_LAYER) * 4096, 4096).unwrap();
        assert!(gap.iter().all(|&b| b == 0));
    }
}
