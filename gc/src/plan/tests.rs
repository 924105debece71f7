use super::*;
use mvps::catalog::manifest::{writer_id_hex, LayerRef, Manifest, MANIFEST_FORMAT_VERSION};
use proptest::prelude::*;

const IMG: &str = "a.mvps-image";
const MIN_AGE_MS: u64 = 900_000;
/// "Now" in the tests: well after every blob's creation time unless a test says otherwise.
const NOW_MS: u64 = 1_790_000_000_000;

fn policy(count: u32, days: u64, retention_secs: u64) -> Policy {
    Policy {
        manifest_retention_secs: retention_secs,
        inactive_days: days,
        inactive_count: count,
        min_blob_age_ms: MIN_AGE_MS,
    }
}

fn blob_id(n: u64, created_ms: u64) -> String {
    // Deterministic ids: the ULID time is `created_ms`, the rest derived from `n`.
    let id = keys::new_blob_id_at(created_ms);
    let (time, _) = id.split_at(10);
    format!("{time}{:016}-{:016}{}", n, n, keys::BLOB_ID_SUFFIX)
}

fn obj(key: &str, size: u64, modified_unix: u64) -> ObjectInfo {
    ObjectInfo {
        key: key.to_string(),
        size_bytes: size,
        last_modified_unix: modified_unix,
    }
}

fn manifest(image: &str, generation: u64, blobs: &[&str]) -> Manifest {
    Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        image_id: image.into(),
        generation,
        change_count: generation,
        writer_id: writer_id_hex(1),
        page_size_bits: 12,
        layers: blobs
            .iter()
            .map(|b| LayerRef {
                blob_id: b.to_string(),
                size_bytes: 10,
                data_pages: 1,
            })
            .collect(),
        created_at_unix: 0,
    }
}

/// A store's state: manifests (image, generation, blobs, modified), blobs (id, modified).
struct World {
    listing: Listing,
    reads: HashMap<String, Read>,
    marks: HashMap<String, Mark>,
}

impl World {
    fn new() -> World {
        World {
            listing: Listing::default(),
            reads: HashMap::new(),
            marks: HashMap::new(),
        }
    }
    fn manifest(&mut self, image: &str, generation: u64, blobs: &[&str], modified: u64) {
        let m = manifest(image, generation, blobs);
        self.listing.manifests.push(obj(&m.key(), 100, modified));
        self.reads.insert(m.key(), Read::Manifest(m));
    }
    fn blob(&mut self, id: &str, modified: u64) {
        self.listing
            .blobs
            .push(obj(&keys::blob_key(id), 10, modified));
    }
    fn mark(&mut self, id: &str, seen: u32, first: u64) {
        self.listing
            .marks
            .push(obj(&keys::gcmark_key(id), 10, first));
        self.marks.insert(
            id.to_string(),
            Mark {
                format_version: GCMARK_FORMAT_VERSION,
                blob_id: id.into(),
                seen_count: seen,
                first_seen_unused_at: first,
            },
        );
    }
    fn plan(&self, p: &Policy, now_ms: u64) -> Result<Plan, Stop> {
        plan(&Inputs {
            listing: &self.listing,
            reads: &self.reads,
            marks: &self.marks,
            previous: None,
            now_ms,
            policy: p,
        })
    }
}

fn old() -> u64 {
    NOW_MS - 10 * MIN_AGE_MS
}

#[test]
fn keeps_newest_and_recent_deletes_older_manifests() {
    let now = NOW_MS / 1000;
    let b = blob_id(1, old());
    let mut w = World::new();
    w.blob(&b, old() / 1000);
    w.manifest(IMG, 1, &[&b], now - 3000);
    w.manifest(IMG, 2, &[&b], now - 2000); // superseded 100 s ago by 3
    w.manifest(IMG, 3, &[&b], now - 100);
    let p = w.plan(&policy(1, 0, 900), NOW_MS).unwrap();
    assert_eq!(
        p.manifests_kept,
        vec![keys::manifest_key(IMG, 3), keys::manifest_key(IMG, 2)]
    );
    assert_eq!(p.delete_manifests, vec![keys::manifest_key(IMG, 1)]);
    // With no retention only the newest stays.
    let p = w.plan(&policy(1, 0, 0), NOW_MS).unwrap();
    assert_eq!(p.manifests_kept, vec![keys::manifest_key(IMG, 3)]);
    assert_eq!(p.delete_manifests.len(), 2);
    assert!(p.delete_blobs.is_empty());
}

#[test]
fn blobs_go_only_after_count_days_and_minimum_age() {
    let live = blob_id(1, old());
    let dead = blob_id(2, old());
    let young = blob_id(3, NOW_MS - MIN_AGE_MS / 2);
    let mut w = World::new();
    for b in [&live, &dead] {
        w.blob(b, old() / 1000);
    }
    // Listed by the store as just modified: too young by the store's clock.
    let touched = blob_id(4, old());
    w.blob(&touched, NOW_MS / 1000);
    w.blob(&young, NOW_MS / 1000 - 1);
    w.manifest(IMG, 1, &[&live], NOW_MS / 1000 - 5000);
    // count 3: first pass marks, nothing deleted.
    let p = w.plan(&policy(3, 0, 0), NOW_MS).unwrap();
    assert!(p.delete_blobs.is_empty());
    let marked: Vec<&str> = p.write_marks.iter().map(|m| m.blob_id.as_str()).collect();
    assert_eq!(marked, vec![dead.as_str()]);
    assert_eq!(p.write_marks[0].seen_count, 1);
    // Seen twice before: this is the third pass, deleted.
    w.mark(&dead, 2, NOW_MS / 1000 - 100);
    let p = w.plan(&policy(3, 0, 0), NOW_MS).unwrap();
    assert_eq!(p.delete_blobs, vec![(keys::blob_key(&dead), 10)]);
    assert_eq!(p.delete_marks, vec![keys::gcmark_key(&dead)]);
    // ... unless the days threshold is not met yet: then the mark is counted up.
    let p = w.plan(&policy(3, 1, 0), NOW_MS).unwrap();
    assert!(p.delete_blobs.is_empty());
    assert_eq!(p.write_marks[0].seen_count, 3);
    assert_eq!(p.write_marks[0].first_seen_unused_at, NOW_MS / 1000 - 100);
    // Past the count, only time is missing: the mark is not rewritten.
    w.mark(&dead, 3, NOW_MS / 1000 - 100);
    let p = w.plan(&policy(3, 1, 0), NOW_MS).unwrap();
    assert!(p.write_marks.is_empty() && p.delete_blobs.is_empty());
    assert_eq!(p.blobs_marked, 1);
    let day_later = NOW_MS + SECS_PER_DAY * 1000;
    let p = w.plan(&policy(3, 1, 0), day_later).unwrap();
    assert_eq!(p.delete_blobs, vec![(keys::blob_key(&dead), 10)]);
    assert_eq!(p.write_marks.len(), 2, "the two now old enough get marks");
}

#[test]
fn threshold_zero_cannot_lower_the_minimum_age() {
    let young = blob_id(1, NOW_MS - MIN_AGE_MS + 1000);
    let mut w = World::new();
    w.blob(&young, (NOW_MS - MIN_AGE_MS) / 1000);
    w.manifest(IMG, 1, &[], NOW_MS / 1000);
    let p = w.plan(&policy(1, 0, 0), NOW_MS).unwrap();
    assert!(p.delete_blobs.is_empty() && p.write_marks.is_empty());
    let p = w.plan(&policy(1, 0, 0), NOW_MS + 1000).unwrap();
    assert_eq!(p.delete_blobs.len(), 1);
}

#[test]
fn a_referenced_blob_loses_its_mark_and_orphan_marks_go() {
    let b = blob_id(1, old());
    let gone = blob_id(2, old());
    let mut w = World::new();
    w.blob(&b, old() / 1000);
    w.manifest(IMG, 1, &[&b], NOW_MS / 1000);
    w.mark(&b, 5, 0);
    w.mark(&gone, 1, 0);
    w.listing
        .marks
        .push(obj(keys::GC_PASS_KEY, 10, NOW_MS / 1000));
    let p = w.plan(&policy(1, 0, 0), NOW_MS).unwrap();
    assert!(p.delete_blobs.is_empty());
    let mut dm = p.delete_marks.clone();
    dm.sort();
    let mut want = vec![keys::gcmark_key(&b), keys::gcmark_key(&gone)];
    want.sort();
    assert_eq!(dm, want);
}

#[test]
fn cut_short_newest_keeps_down_to_a_complete_manifest() {
    let b1 = blob_id(1, old());
    let b2 = blob_id(2, old());
    let mut w = World::new();
    w.blob(&b1, old() / 1000);
    w.blob(&b2, old() / 1000);
    w.manifest(IMG, 1, &[&b1], 0);
    w.manifest(IMG, 2, &[&b2], 0);
    let cut = keys::manifest_key(IMG, 3);
    w.listing.manifests.push(obj(&cut, 0, 0));
    w.reads.insert(cut.clone(), Read::CutShort);
    let p = w.plan(&policy(1, 0, 0), NOW_MS).unwrap();
    assert_eq!(p.manifests_kept, vec![cut, keys::manifest_key(IMG, 2)]);
    assert_eq!(p.delete_blobs, vec![(keys::blob_key(&b1), 10)]);
}

#[test]
fn manifests_are_read_in_rounds() {
    let mut w = World::new();
    w.manifest(IMG, 1, &[], 0);
    w.manifest(IMG, 2, &[], NOW_MS / 1000 - 100);
    w.manifest(IMG, 3, &[], NOW_MS / 1000 - 10);
    let p = policy(1, 0, 60);
    let mut reads = HashMap::new();
    let first = manifests_kept(&w.listing, &reads, NOW_MS / 1000, &p);
    assert_eq!(first, vec![keys::manifest_key(IMG, 3)]);
    for k in &first {
        reads.insert(k.clone(), w.reads[k].clone());
    }
    let second = manifests_kept(&w.listing, &reads, NOW_MS / 1000, &p);
    assert_eq!(second.len(), 2, "{second:?}");
}

#[test]
fn sanity_stops() {
    let b = blob_id(1, old());
    let mut w = World::new();
    w.blob(&b, 0);
    assert_eq!(
        w.plan(&policy(1, 0, 0), NOW_MS),
        Err(Stop::NoManifests { blobs: 1 })
    );
    let missing = blob_id(2, old());
    w.manifest(IMG, 1, &[&missing], 0);
    let e = w.plan(&policy(1, 0, 0), NOW_MS).unwrap_err();
    assert!(matches!(e, Stop::MissingBlob { .. }), "{e:?}");
    assert!(e.to_string().contains("CORRUPTION"), "{e}");
    // A kept manifest that was not read.
    let mut w = World::new();
    w.manifest(IMG, 1, &[], 0);
    w.reads.clear();
    assert!(matches!(
        w.plan(&policy(1, 0, 0), NOW_MS),
        Err(Stop::Unreadable { .. })
    ));
    // Shrinking listing.
    let mut w = World::new();
    w.manifest(IMG, 1, &[], 0);
    let prev = PassRecord {
        format_version: GCMARK_FORMAT_VERSION,
        started_at: 0,
        manifests_kept: 10,
    };
    let e = plan(&Inputs {
        listing: &w.listing,
        reads: &w.reads,
        marks: &w.marks,
        previous: Some(&prev),
        now_ms: NOW_MS,
        policy: &policy(1, 0, 0),
    })
    .unwrap_err();
    assert!(e.to_string().contains(keys::GC_PASS_KEY), "{e}");
    // Something under images/ that is not a manifest key.
    let mut w = World::new();
    w.manifest(IMG, 1, &[], 0);
    w.listing
        .manifests
        .push(obj("images/a.mvps-image/notes.txt", 1, 0));
    let e = w.plan(&policy(1, 0, 0), NOW_MS).unwrap_err();
    assert!(e.to_string().contains("notes.txt"), "{e}");
    // An empty store is fine.
    let p = World::new().plan(&policy(1, 0, 0), NOW_MS).unwrap();
    assert_eq!(
        p,
        Plan {
            record: p.record.clone(),
            ..Plan::default()
        }
    );
}

#[test]
fn old_uploads_are_aborted() {
    let mut w = World::new();
    let now = NOW_MS / 1000;
    for (id, at) in [("old", now - UPLOAD_MAX_AGE_SECS - 1), ("new", now - 60)] {
        w.listing.uploads.push(UploadInfo {
            key: keys::blob_key(&blob_id(1, old())),
            upload_id: id.into(),
            initiated_unix: at,
        });
    }
    let p = w.plan(&policy(1, 0, 0), NOW_MS).unwrap();
    let ids: Vec<&str> = p
        .abort_uploads
        .iter()
        .map(|u| u.upload_id.as_str())
        .collect();
    assert_eq!(ids, vec!["old"]);
}

// ------------------------------------------------------------------------- property test

/// One pool blob: created ms before now, listed, mark (seen, first seen s before now).
type PoolBlob = (u64, bool, Option<(u32, u64)>);

/// A random history: images with manifests whose layers are drawn from a pool of blobs,
/// cut-short objects, marks with random counts and times, random clocks and thresholds.
#[derive(Debug, Clone)]
struct History {
    /// Per image: per generation (oldest first): (layer indexes into the pool, cut short,
    /// modified seconds before now).
    images: Vec<Vec<(Vec<usize>, bool, u64)>>,
    /// Per pool blob: (created ms before now, listed, mark (seen, first seen s before now)).
    blobs: Vec<PoolBlob>,
    count: u32,
    days: u64,
    retention: u64,
}

fn history() -> impl Strategy<Value = History> {
    let blob = (
        0u64..4 * MIN_AGE_MS,
        prop::bool::weighted(0.95),
        prop::option::of((1u32..5, 0u64..200_000)),
    );
    (prop::collection::vec(blob, 1..30), 1usize..4).prop_flat_map(|(blobs, images)| {
        let n = blobs.len();
        let generation = (
            prop::collection::vec(0..n, 0..5),
            prop::bool::weighted(0.1),
            0u64..4000,
        );
        (
            Just(blobs),
            prop::collection::vec(prop::collection::vec(generation, 1..8), images),
            0u32..4,
            0u64..3,
            0u64..2000,
        )
            .prop_map(|(blobs, images, count, days, retention)| History {
                images,
                blobs,
                count,
                days,
                retention,
            })
    })
}

fn world_of(h: &History) -> (World, Vec<String>) {
    let ids: Vec<String> = h
        .blobs
        .iter()
        .enumerate()
        .map(|(i, (age, _, _))| blob_id(i as u64, NOW_MS - age))
        .collect();
    let mut w = World::new();
    for (i, (age, listed, mark)) in h.blobs.iter().enumerate() {
        if *listed {
            w.blob(&ids[i], (NOW_MS - age) / 1000);
        }
        if let Some((seen, first)) = mark {
            w.mark(&ids[i], *seen, NOW_MS / 1000 - first);
        }
    }
    for (img, gens) in h.images.iter().enumerate() {
        let image = format!("i{img}.mvps-image");
        // Modified times go down with the generation, as in a real store.
        let mut modified = NOW_MS / 1000;
        for (g, (layers, cut, step)) in gens.iter().enumerate().rev() {
            modified -= step;
            let mut names: Vec<&str> = layers.iter().map(|&i| ids[i].as_str()).collect();
            names.dedup();
            let mut seen = HashSet::new();
            names.retain(|n| seen.insert(*n));
            let m = manifest(&image, g as u64 + 1, &names);
            w.listing.manifests.push(obj(&m.key(), 100, modified));
            let read = if *cut {
                Read::CutShort
            } else {
                Read::Manifest(m.clone())
            };
            w.reads.insert(m.key(), read);
        }
    }
    (w, ids)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No plan deletes the newest manifest of an image, a manifest it keeps, or a blob that
    /// a kept manifest names; nothing younger than the minimum age goes; and with every
    /// blob and manifest listed, a plan is always made.
    #[test]
    fn no_plan_deletes_live_data(h in history()) {
        let (w, ids) = world_of(&h);
        let p = policy(h.count, h.days, h.retention);
        match w.plan(&p, NOW_MS) {
            Err(Stop::MissingBlob { blob_id, .. }) => {
                let i = ids.iter().position(|b| *b == blob_id).unwrap();
                prop_assert!(!h.blobs[i].1, "stopped for a blob that is listed");
            }
            Err(e) => prop_assert!(false, "unexpected stop: {e}"),
            Ok(plan) => {
                check_safe(&plan, &w.listing, &w.reads).map_err(|e| TestCaseError::fail(e.to_string()))?;
                // Independently: the newest key of each image survives, and every layer
                // of every newest complete manifest survives.
                let deleted: HashSet<&String> = plan.delete_manifests.iter().collect();
                let gone: HashSet<&str> = plan.delete_blobs.iter().filter_map(|(k, _)| keys::parse_blob_key(k)).collect();
                for (img, gens) in h.images.iter().enumerate() {
                    let image = format!("i{img}.mvps-image");
                    let newest = keys::manifest_key(&image, gens.len() as u64);
                    prop_assert!(!deleted.contains(&newest));
                    if let Some(g) = (0..gens.len()).rev().find(|&g| !gens[g].1) {
                        let key = keys::manifest_key(&image, g as u64 + 1);
                        prop_assert!(!deleted.contains(&key), "newest complete manifest deleted");
                        for &l in &gens[g].0 {
                            prop_assert!(!gone.contains(ids[l].as_str()));
                        }
                    }
                }
                for (i, (age, _, _)) in h.blobs.iter().enumerate() {
                    if *age < MIN_AGE_MS {
                        prop_assert!(!gone.contains(ids[i].as_str()), "young blob deleted");
                    }
                }
            }
        }
    }
}
