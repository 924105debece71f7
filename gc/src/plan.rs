//! The planner: a pure function from what a pass listed and read to what it will do
//! (DESIGN §8, docs/FORMAT.md *Garbage collection*). Nothing here does I/O, so every rule is
//! unit- and property-tested; the executor (`pass.rs`) only lists, reads and carries out.
//!
//! Rules:
//! - per image, keep the newest manifest, and every manifest that was the newest less than
//!   the retention window ago (its successor is younger than the window); when the newest
//!   objects are cut short, keep down to the newest complete manifest;
//! - the referenced set is every layer of every kept manifest; a kept manifest that is
//!   unread or damaged stops the pass (never "references nothing");
//! - an unreferenced blob past the minimum age gets a mark; it is deleted only when the
//!   mark's pass count and age meet the thresholds; a referenced blob loses its mark;
//! - sanity stops: blobs but no manifests, a kept manifest naming a missing blob, a
//!   manifest listing much smaller than the previous pass kept, an object under `images/`
//!   that is not a manifest key.

use mvps::catalog::gcmark::{Mark, PassRecord, GCMARK_FORMAT_VERSION};
use mvps::catalog::keys;
use mvps::catalog::manifest::Read;
use mvps::store::{ObjectInfo, UploadInfo};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Multipart uploads older than this are aborted: no upload of ours runs for a day, and
/// their parts never show in a plain listing but are billed forever.
pub const UPLOAD_MAX_AGE_SECS: u64 = 24 * 60 * 60;

pub const SECS_PER_DAY: u64 = 24 * 60 * 60;

/// A manifest listing smaller than the previous pass's kept manifests divided by this stops
/// the pass: between passes only the collector deletes manifests, so a listing that shrank
/// that much means manifests were lost, or the listing is wrong.
pub const MANIFEST_SHRINK_FACTOR: u64 = 2;

/// What the operator chose (flags), and the fixed minimum blob age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub manifest_retention_secs: u64,
    pub inactive_days: u64,
    pub inactive_count: u32,
    /// `catalog::min_blob_age()`: no flag lowers it.
    pub min_blob_age_ms: u64,
}

/// The listings of one pass. The manifests are listed before the rest starts, so every blob
/// a listed manifest names existed when the blobs were listed.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Objects under `images/`.
    pub manifests: Vec<ObjectInfo>,
    /// Objects under `blobs/`.
    pub blobs: Vec<ObjectInfo>,
    /// Objects under `gcmark/` (marks and the pass record).
    pub marks: Vec<ObjectInfo>,
    pub uploads: Vec<UploadInfo>,
}

/// Why a pass stops before deleting anything (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Blobs exist, but no manifest does.
    NoManifests { blobs: usize },
    /// A kept manifest names a blob that is not in the store.
    MissingBlob { manifest: String, blob_id: String },
    /// Far fewer manifests than the previous pass kept.
    ManifestsShrank { listed: u64, previous_kept: u64 },
    /// A kept manifest could not be read or parsed (or was never read).
    Unreadable { key: String, why: String },
    /// A listing or read failed.
    Store { what: String, why: String },
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::NoManifests { blobs } => write!(
                f,
                "{blobs} blobs but no manifest under images/: nothing deleted. Check that \
                 --prefix (or --image-store-local-path) names the image store itself, and \
                 that its images/ objects were not lost"
            ),
            Stop::MissingBlob { manifest, blob_id } => write!(
                f,
                "CORRUPTION: manifest {manifest} names blob {blob_id}, which is not in the \
                 store. Nothing deleted. The image cannot be read whole: restore the blob \
                 (from a backup or bucket versioning) and find out what deleted it"
            ),
            Stop::ManifestsShrank {
                listed,
                previous_kept,
            } => write!(
                f,
                "{listed} manifests listed, but the previous pass kept {previous_kept}: \
                 nothing deleted. Something other than this collector deleted manifests, or \
                 the listing is incomplete. Check the store; if the drop is intended (images \
                 removed), delete {} and run again",
                keys::GC_PASS_KEY
            ),
            Stop::Unreadable { key, why } => write!(
                f,
                "manifest {key} cannot be used ({why}): nothing deleted, as its blobs would \
                 look unreferenced. Check or restore the object"
            ),
            Stop::Store { what, why } => write!(
                f,
                "{what} failed: {why}. Nothing deleted. Check the bucket, prefix, credentials \
                 (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) and S3_ENDPOINT"
            ),
        }
    }
}

/// What a pass does. Keys are relative to the store root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub manifests_kept: Vec<String>,
    pub delete_manifests: Vec<String>,
    pub blobs_referenced: usize,
    /// Marks to write (new, or one more pass counted).
    pub write_marks: Vec<Mark>,
    /// Unreferenced blobs marked (written or already at the count) and kept this pass.
    pub blobs_marked: usize,
    /// (key, size in bytes).
    pub delete_blobs: Vec<(String, u64)>,
    pub delete_marks: Vec<String>,
    pub abort_uploads: Vec<UploadInfo>,
    /// Objects ignored because their keys are not ours (reported, never deleted).
    pub foreign_keys: usize,
    pub record: PassRecord,
}

impl Plan {
    pub fn bytes_freed(&self) -> u64 {
        self.delete_blobs.iter().map(|(_, b)| b).sum()
    }
}

/// Manifest keys per image, newest first.
fn by_image(listing: &Listing) -> BTreeMap<&str, Vec<(u64, &ObjectInfo)>> {
    let mut images: BTreeMap<&str, Vec<(u64, &ObjectInfo)>> = BTreeMap::new();
    for o in &listing.manifests {
        if let Some((image, generation)) = keys::parse_manifest_key(&o.key) {
            images.entry(image).or_default().push((generation, o));
        }
    }
    for v in images.values_mut() {
        v.sort_by_key(|g| std::cmp::Reverse(g.0));
    }
    images
}

/// The manifests kept, per image newest first, given the manifests read so far: the newest,
/// those superseded less than the retention window ago, and — while every kept one read so
/// far is cut short — the next older one. Keys not yet read are part of the answer; the
/// executor reads them and asks again until the answer is stable.
pub fn manifests_kept(
    listing: &Listing,
    reads: &HashMap<String, Read>,
    now_unix: u64,
    policy: &Policy,
) -> Vec<String> {
    let mut kept = Vec::new();
    for gens in by_image(listing).values() {
        let mut complete = false;
        for (i, (_, o)) in gens.iter().enumerate() {
            // Newest, or superseded (its successor written) within the retention window.
            let recent = i == 0
                || now_unix.saturating_sub(gens[i - 1].1.last_modified_unix)
                    < policy.manifest_retention_secs;
            // Readers skip cut-short objects down to the newest complete manifest.
            let needed = !complete;
            if !recent && !needed {
                break;
            }
            kept.push(o.key.clone());
            match reads.get(&o.key) {
                Some(Read::Manifest(_)) => complete = true,
                Some(Read::CutShort) => {}
                // Unread and needed: nothing older is known to be needed until it is read.
                None if needed => break,
                None => {}
            }
        }
    }
    kept
}

/// The marks worth reading: those of unreferenced blobs past the minimum age (their count
/// and first sighting decide). Marks of referenced or missing blobs are deleted unread.
pub fn marks_to_read(
    listing: &Listing,
    referenced: &HashSet<String>,
    now_ms: u64,
    policy: &Policy,
) -> Vec<String> {
    let marked: HashSet<&str> = listing
        .marks
        .iter()
        .filter_map(|o| keys::parse_gcmark_key(&o.key))
        .collect();
    listing
        .blobs
        .iter()
        .filter_map(|o| keys::parse_blob_key(&o.key).map(|id| (id, o)))
        .filter(|(id, o)| {
            !referenced.contains(*id) && marked.contains(id) && old_enough(id, o, now_ms, policy)
        })
        .map(|(id, _)| keys::gcmark_key(id))
        .collect()
}

/// Past the minimum age both by the ULID in its id and by the store's modification time.
fn old_enough(blob_id: &str, o: &ObjectInfo, now_ms: u64, policy: &Policy) -> bool {
    let Some(created_ms) = keys::blob_created_unix_ms(blob_id) else {
        return false;
    };
    let youngest = created_ms.max(o.last_modified_unix.saturating_mul(1000));
    now_ms.saturating_sub(youngest) >= policy.min_blob_age_ms
}

/// The referenced set: every layer of the kept manifests. A kept manifest that was not read
/// as a manifest or a cut-short object stops the pass.
pub fn referenced(kept: &[String], reads: &HashMap<String, Read>) -> Result<HashSet<String>, Stop> {
    let mut set = HashSet::new();
    for key in kept {
        match reads.get(key) {
            Some(Read::Manifest(m)) => set.extend(m.layers.iter().map(|l| l.blob_id.clone())),
            Some(Read::CutShort) => {}
            None => {
                return Err(Stop::Unreadable {
                    key: key.clone(),
                    why: "not read".into(),
                })
            }
        }
    }
    Ok(set)
}

/// Everything a pass needs to decide, gathered by the executor.
pub struct Inputs<'a> {
    pub listing: &'a Listing,
    /// Kept manifests as read (every key [`manifests_kept`] returns must be here).
    pub reads: &'a HashMap<String, Read>,
    /// Marks read (by blob id); unreadable marks are left out (treated as absent).
    pub marks: &'a HashMap<String, Mark>,
    pub previous: Option<&'a PassRecord>,
    pub now_ms: u64,
    pub policy: &'a Policy,
}

/// The plan of one pass, or why it must stop with nothing deleted.
pub fn plan(i: &Inputs) -> Result<Plan, Stop> {
    let listing = i.listing;
    let now_unix = i.now_ms / 1000;
    let manifest_count = listing
        .manifests
        .iter()
        .filter(|o| keys::parse_manifest_key(&o.key).is_some())
        .count();
    let blob_count = listing
        .blobs
        .iter()
        .filter(|o| keys::parse_blob_key(&o.key).is_some())
        .count();
    // An object under images/ that is not a manifest key might be a manifest of a format
    // this collector does not know: its blobs would look unreferenced.
    if let Some(o) = listing
        .manifests
        .iter()
        .find(|o| keys::parse_manifest_key(&o.key).is_none())
    {
        return Err(Stop::Unreadable {
            key: o.key.clone(),
            why: "not a manifest key (images/<image_id>/<16 hex digits>.json); move it out of \
                  images/"
                .into(),
        });
    }
    if manifest_count == 0 && blob_count > 0 {
        return Err(Stop::NoManifests { blobs: blob_count });
    }
    if let Some(prev) = i.previous {
        let listed = manifest_count as u64;
        if listed.saturating_mul(MANIFEST_SHRINK_FACTOR) < prev.manifests_kept {
            return Err(Stop::ManifestsShrank {
                listed,
                previous_kept: prev.manifests_kept,
            });
        }
    }
    let kept = manifests_kept(listing, i.reads, now_unix, i.policy);
    let referenced = referenced(&kept, i.reads)?;
    let kept_set: HashSet<&str> = kept.iter().map(String::as_str).collect();
    let blobs: HashMap<&str, &ObjectInfo> = listing
        .blobs
        .iter()
        .filter_map(|o| keys::parse_blob_key(&o.key).map(|id| (id, o)))
        .collect();
    // Corruption check, in key order so the message is stable.
    for key in &kept {
        if let Some(Read::Manifest(m)) = i.reads.get(key) {
            if let Some(l) = m
                .layers
                .iter()
                .find(|l| !blobs.contains_key(l.blob_id.as_str()))
            {
                return Err(Stop::MissingBlob {
                    manifest: key.clone(),
                    blob_id: l.blob_id.clone(),
                });
            }
        }
    }

    let mut p = Plan {
        blobs_referenced: referenced.len(),
        ..Plan::default()
    };
    for o in &listing.manifests {
        if !kept_set.contains(o.key.as_str()) {
            p.delete_manifests.push(o.key.clone());
        }
    }
    p.manifests_kept = kept;

    let days_ms = i.policy.inactive_days.saturating_mul(SECS_PER_DAY * 1000);
    let mut blob_ids: Vec<&str> = blobs.keys().copied().collect();
    blob_ids.sort_unstable();
    let mut keep_mark: HashSet<&str> = HashSet::new();
    for id in blob_ids {
        let o = blobs[id];
        if referenced.contains(id) || !old_enough(id, o, i.now_ms, i.policy) {
            continue;
        }
        let mark = match i.marks.get(id) {
            Some(m) => Mark {
                seen_count: m.seen_count.saturating_add(1),
                ..m.clone()
            },
            None => Mark {
                format_version: GCMARK_FORMAT_VERSION,
                blob_id: id.to_string(),
                seen_count: 1,
                first_seen_unused_at: now_unix,
            },
        };
        let unused_for_ms = i
            .now_ms
            .saturating_sub(mark.first_seen_unused_at.saturating_mul(1000));
        if mark.seen_count >= i.policy.inactive_count && unused_for_ms >= days_ms {
            p.delete_blobs.push((o.key.clone(), o.size_bytes));
            continue;
        }
        p.blobs_marked += 1;
        keep_mark.insert(id);
        // Once the count is reached only time is missing: the mark is not rewritten, so a
        // pass over long-pending garbage costs no writes.
        let counted = i
            .marks
            .get(id)
            .is_some_and(|m| m.seen_count >= i.policy.inactive_count);
        if !counted {
            p.write_marks.push(mark);
        }
    }
    // Every other mark goes: its blob is referenced again, deleted now, or gone.
    for o in &listing.marks {
        match keys::parse_gcmark_key(&o.key) {
            Some(id) if keep_mark.contains(id) => {}
            Some(_) => p.delete_marks.push(o.key.clone()),
            None if o.key == keys::GC_PASS_KEY => {}
            None => p.foreign_keys += 1,
        }
    }
    p.foreign_keys += listing
        .blobs
        .iter()
        .filter(|o| keys::parse_blob_key(&o.key).is_none())
        .count();
    p.abort_uploads = listing
        .uploads
        .iter()
        .filter(|u| {
            u.initiated_unix > 0 && now_unix.saturating_sub(u.initiated_unix) > UPLOAD_MAX_AGE_SECS
        })
        .cloned()
        .collect();
    p.record = PassRecord {
        format_version: GCMARK_FORMAT_VERSION,
        started_at: now_unix,
        manifests_kept: p.manifests_kept.len() as u64,
    };
    check_safe(&p, i.listing, i.reads)?;
    Ok(p)
}

/// The plan's safety invariants, checked on every plan before anything runs (and by the
/// property test): no image loses its newest manifest, and no blob named by a kept
/// manifest is deleted.
pub fn check_safe(p: &Plan, listing: &Listing, reads: &HashMap<String, Read>) -> Result<(), Stop> {
    let deleted: HashSet<&str> = p.delete_manifests.iter().map(String::as_str).collect();
    for gens in by_image(listing).values() {
        if let Some((_, newest)) = gens.first() {
            if deleted.contains(newest.key.as_str()) {
                return Err(internal(format!(
                    "the plan deletes newest manifest {}",
                    newest.key
                )));
            }
        }
    }
    let gone: HashSet<&str> = p
        .delete_blobs
        .iter()
        .filter_map(|(k, _)| keys::parse_blob_key(k))
        .collect();
    for key in &p.manifests_kept {
        if deleted.contains(key.as_str()) {
            return Err(internal(format!("the plan keeps and deletes {key}")));
        }
        if let Some(Read::Manifest(m)) = reads.get(key) {
            if let Some(l) = m.layers.iter().find(|l| gone.contains(l.blob_id.as_str())) {
                return Err(internal(format!(
                    "the plan deletes blob {} of kept manifest {key}",
                    l.blob_id
                )));
            }
        }
    }
    Ok(())
}

fn internal(why: String) -> Stop {
    Stop::Unreadable {
        key: "(plan)".into(),
        why: format!("internal error, refusing to run: {why}"),
    }
}

#[cfg(test)]
mod tests;
