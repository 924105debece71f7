//! Writer fencing on S3 (DESIGN §3), end to end: two `mvps-te` processes with different
//! buffer stores serve one image from one bucket. The second takes the image over (a
//! conditional create of manifest g+1 naming its writer id); the first learns it at its next
//! checkpoint, whose conditional create of g+1 fails with 412: its log says it is fenced,
//! its writes from then on fail with EIO, and nothing it wrote after the takeover is visible
//! through the second server or in any manifest.

mod s3_common;

use mvps::engine::manifest::Manifest;
use mvps::store::{keys, ImageStore};
use mvps_conformance::token;
use mvps_conformance::tools::{pattern, wait_for};
use s3_common::S3;
use std::time::Duration;

const SIZE: u64 = 16 << 20;
const MIB: u64 = 1 << 20;
/// NBD_EIO.
const EIO: u32 = 5;

/// Every manifest of `image_id` in the bucket, oldest first.
fn manifests(s3: &S3, image_id: &str) -> Vec<Manifest> {
    let store = s3.store();
    let mut all: Vec<Manifest> = store
        .list(&keys::manifest_prefix(image_id), None)
        .unwrap()
        .iter()
        .map(|o| serde_json::from_slice(&store.get(&o.key).unwrap()).unwrap())
        .collect();
    all.sort_by_key(|m| m.generation);
    all
}

#[test]
fn a_second_server_takes_over_and_the_first_is_fenced_at_its_next_checkpoint() {
    let s3 = S3::new();
    let mut a = s3.start(&[]);
    let id = token::image_id("s3-fence");
    let tok = token::token(&id, SIZE);
    let before = pattern(1, 64 << 10);
    let mut ca = a.open(&tok);
    ca.write(0, &before).unwrap();
    ca.flush().unwrap();
    let checkpointed = s3.wait_for_changes(&id, 1, Duration::from_secs(30));
    let writer_a = checkpointed.writer_id.clone();

    // B, with its own buffer store, takes over; A keeps its connection (and session) open.
    let b = s3.start(&[]);
    let mut cb = b.open(&tok);
    assert_eq!(cb.read(0, before.len() as u32), Ok(before.clone()));
    let takeover = s3.manifest(&id).unwrap();
    assert_ne!(
        takeover.writer_id, writer_a,
        "B did not write a takeover manifest"
    );
    assert_eq!(takeover.generation, checkpointed.generation + 1);

    // A does not know yet: its write lands in its own WAL. Its next checkpoint is fenced.
    let after = pattern(2, 8192);
    assert_eq!(ca.write(MIB, &after), Ok(()));
    wait_for(
        "A to log that it is fenced",
        Duration::from_secs(30),
        || a.log().contains("fenced").then_some(()),
    );
    // From now on A's writes fail (EIO) and it refuses new connections to the image.
    assert_eq!(ca.write(2 * MIB, &[7; 4096]), Err(EIO));
    assert_eq!(ca.write(0, &[8; 512]), Err(EIO));
    let mut other = a.handshake();
    assert!(
        other.go(&tok).is_err(),
        "a fenced server accepted a new connection"
    );
    a.assert_running();

    // Nothing A wrote after the takeover is visible through B, whose own writes work.
    assert_eq!(cb.read(0, before.len() as u32), Ok(before.clone()));
    assert_eq!(cb.read(MIB, 8192), Ok(vec![0; 8192]), "A's write leaked");
    assert_eq!(
        cb.read(2 * MIB, 4096),
        Ok(vec![0; 4096]),
        "A's write leaked"
    );
    let mine = pattern(3, 4096);
    cb.write(3 * MIB, &mine).unwrap();
    cb.flush().unwrap();
    let m = s3.wait_for_changes(&id, takeover.change_count + 1, Duration::from_secs(30));
    assert_eq!(m.writer_id, takeover.writer_id);

    // Every manifest from the takeover on is B's: no split-brain write landed.
    let all = manifests(&s3, &id);
    assert!(all.len() as u64 > takeover.generation);
    for m in all.iter().filter(|m| m.generation >= takeover.generation) {
        assert_eq!(
            m.writer_id, takeover.writer_id,
            "manifest by a fenced writer: {m:?}"
        );
    }
    // And a third, fresh reader sees B's data and not A's late write.
    drop(cb);
    let c = s3.start(&[]);
    let mut cc = c.open(&tok);
    assert_eq!(cc.read(3 * MIB, 4096), Ok(mine));
    assert_eq!(cc.read(MIB, 8192), Ok(vec![0; 8192]));
    assert!(a.log().contains(&id), "{}", a.log_tail());
}
