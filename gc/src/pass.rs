//! One pass against a store: list, read what the planner needs, plan, execute. All I/O of
//! the collector is here; every decision is in [`crate::plan`].

use crate::plan::{self, Inputs, Listing, Plan, Policy, Stop};
use crate::Summary;
use mvps::catalog::gcmark::{Mark, PassRecord};
use mvps::catalog::keys;
use mvps::catalog::manifest::{self, Read};
use mvps::store::{self, ImageStore};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Keys per delete request (DeleteObjects' limit).
pub const DELETE_BATCH_KEYS: usize = mvps::s3::request::DELETE_BATCH_KEYS_MAX;

/// Rounds of manifest reads before giving up: each round reads what the previous one showed
/// to be needed (the newest, then those retained, then older ones below cut-short objects).
const READ_ROUNDS_MAX: usize = 64;

/// Runs `f` over `items` on up to `workers` threads; results in item order.
pub fn parallel<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<R>>> = (0..items.len())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                *slots[i].lock().unwrap() = Some(f(item));
            });
        }
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().unwrap().expect("every item ran"))
        .collect()
}

fn store_stop(what: &str, e: store::Error) -> Stop {
    Stop::Store {
        what: what.to_string(),
        why: e.to_string(),
    }
}

/// The listings, manifests first (see [`Listing`]), the rest in parallel.
fn list(store: &dyn ImageStore) -> Result<Listing, Stop> {
    let manifests = store
        .list(keys::IMAGES_PREFIX, None)
        .map_err(|e| store_stop("listing images/", e))?;
    let (blobs, marks, uploads) = std::thread::scope(|s| {
        let blobs = s.spawn(|| store.list(keys::BLOBS_PREFIX, None));
        let marks = s.spawn(|| store.list(keys::GCMARK_PREFIX, None));
        let uploads = store.list_uploads();
        (
            blobs.join().expect("listing thread"),
            marks.join().expect("listing thread"),
            uploads,
        )
    });
    Ok(Listing {
        manifests,
        blobs: blobs.map_err(|e| store_stop("listing blobs/", e))?,
        marks: marks.map_err(|e| store_stop("listing gcmark/", e))?,
        uploads: uploads.map_err(|e| store_stop("listing multipart uploads", e))?,
    })
}

/// Reads every manifest the planner keeps, in rounds, `workers` at a time. Any read or parse
/// failure stops the pass.
fn read_manifests(
    store: &dyn ImageStore,
    listing: &Listing,
    now_unix: u64,
    policy: &Policy,
    workers: usize,
) -> Result<HashMap<String, Read>, Stop> {
    let mut reads: HashMap<String, Read> = HashMap::new();
    for _ in 0..READ_ROUNDS_MAX {
        let wanted: Vec<String> = plan::manifests_kept(listing, &reads, now_unix, policy)
            .into_iter()
            .filter(|k| !reads.contains_key(k))
            .collect();
        if wanted.is_empty() {
            return Ok(reads);
        }
        let got = parallel(&wanted, workers, |key| {
            let bytes = store.get(key).map_err(|e| Stop::Unreadable {
                key: key.clone(),
                why: e.to_string(),
            })?;
            manifest::parse(key, &bytes).map_err(|e| Stop::Unreadable {
                key: key.clone(),
                why: e.to_string(),
            })
        });
        for (key, r) in wanted.into_iter().zip(got) {
            reads.insert(key, r?);
        }
    }
    Err(Stop::Unreadable {
        key: keys::IMAGES_PREFIX.into(),
        why: format!("still finding manifests to read after {READ_ROUNDS_MAX} rounds"),
    })
}

/// Reads the marks the planner needs. A missing mark is no mark; an unreadable one is
/// logged and treated as none (a mark only ever brings a deletion closer).
fn read_marks(
    store: &dyn ImageStore,
    wanted: &[String],
    workers: usize,
) -> Result<HashMap<String, Mark>, Stop> {
    let got = parallel(wanted, workers, |key| match store.get(key) {
        Ok(bytes) => Ok(Mark::parse(key, &bytes)
            .map_err(|e| log::warn!("{e}; counted as no mark"))
            .ok()),
        Err(store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(store_stop("reading gc marks", e)),
    });
    let mut out = HashMap::new();
    for m in got {
        if let Some(m) = m? {
            out.insert(m.blob_id.clone(), m);
        }
    }
    Ok(out)
}

fn read_previous(store: &dyn ImageStore, listing: &Listing) -> Result<Option<PassRecord>, Stop> {
    if !listing.marks.iter().any(|o| o.key == keys::GC_PASS_KEY) {
        return Ok(None);
    }
    let bytes = match store.get(keys::GC_PASS_KEY) {
        Ok(b) => b,
        Err(store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(store_stop("reading the previous pass record", e)),
    };
    PassRecord::parse(&bytes)
        .map(Some)
        .map_err(|why| Stop::Unreadable {
            key: keys::GC_PASS_KEY.into(),
            why: format!("{why}; delete it to go on without the check it feeds"),
        })
}

/// Lists, reads and plans. Nothing is written or deleted.
pub fn plan_pass(store: &dyn ImageStore, policy: &Policy, workers: usize) -> Result<Plan, Stop> {
    // Taken before the manifests are listed: a blob the planner finds old enough at this
    // time cannot be named by a manifest published after the listing (docs/FORMAT.md,
    // *Garbage collection*).
    let now_ms = keys::now_unix_ms();
    let listing = list(store)?;
    let previous = read_previous(store, &listing)?;
    let reads = read_manifests(store, &listing, now_ms / 1000, policy, workers)?;
    let kept = plan::manifests_kept(&listing, &reads, now_ms / 1000, policy);
    let referenced: HashSet<String> = plan::referenced(&kept, &reads)?;
    let wanted = plan::marks_to_read(&listing, &referenced, now_ms, policy);
    let marks = read_marks(store, &wanted, workers)?;
    plan::plan(&Inputs {
        listing: &listing,
        reads: &reads,
        marks: &marks,
        previous: previous.as_ref(),
        now_ms,
        policy,
    })
}

/// Deletes `keys` in batches of [`DELETE_BATCH_KEYS`], `workers` batches at once. Returns
/// whether each batch went through (each failure logged).
fn delete_all(store: &dyn ImageStore, keys: &[String], workers: usize, what: &str) -> Vec<bool> {
    let batches: Vec<&[String]> = keys.chunks(DELETE_BATCH_KEYS).collect();
    let results = parallel(&batches, workers, |b| store.delete_many(b));
    batches
        .iter()
        .zip(results)
        .map(|(b, r)| {
            r.map_err(|e| log::error!("deleting {} {what}: {e}", b.len()))
                .is_ok()
        })
        .collect()
}

/// How many keys the batches that went through held, and how many batches failed.
fn tally(keys: usize, done: &[bool]) -> (u64, u64) {
    let failed = done.iter().filter(|ok| !**ok).count();
    let mut deleted = 0;
    for (i, ok) in done.iter().enumerate() {
        if *ok {
            deleted += (keys - i * DELETE_BATCH_KEYS).min(DELETE_BATCH_KEYS) as u64;
        }
    }
    (deleted, failed as u64)
}

/// Carries out `plan` (or, with `dry_run`, prints it) and sums it up.
pub fn execute(store: &dyn ImageStore, p: &Plan, workers: usize, dry_run: bool) -> Summary {
    let mut s = Summary {
        store: store.describe(),
        dry_run,
        manifests_kept: p.manifests_kept.len() as u64,
        blobs_referenced: p.blobs_referenced as u64,
        blobs_marked: p.blobs_marked as u64,
        foreign_keys: p.foreign_keys as u64,
        ..Summary::default()
    };
    if dry_run {
        for k in &p.delete_manifests {
            println!("would delete manifest {k}");
        }
        for (k, size) in &p.delete_blobs {
            println!("would delete blob {k} ({size} bytes)");
        }
        for m in &p.write_marks {
            println!(
                "would mark blob {} (unreferenced in {} pass(es))",
                m.blob_id, m.seen_count
            );
        }
        for u in &p.abort_uploads {
            println!("would abort multipart upload {} of {}", u.upload_id, u.key);
        }
        s.manifests_deleted = p.delete_manifests.len() as u64;
        s.blobs_deleted = p.delete_blobs.len() as u64;
        s.bytes_freed = p.bytes_freed();
        s.marks_deleted = p.delete_marks.len() as u64;
        s.uploads_aborted = p.abort_uploads.len() as u64;
        return s;
    }
    let wrote = parallel(&p.write_marks, workers, |m| {
        let key = m.key();
        m.check(&key)?;
        store.put(&key, &m.to_bytes()).map_err(|e| e.to_string())
    });
    for (m, r) in p.write_marks.iter().zip(wrote) {
        if let Err(e) = r {
            s.errors += 1;
            log::error!("writing mark of blob {}: {e}", m.blob_id);
        }
    }
    let done = delete_all(store, &p.delete_manifests, workers, "old manifests");
    let (n, failed) = tally(p.delete_manifests.len(), &done);
    s.manifests_deleted = n;
    s.errors += failed;
    let blob_keys: Vec<String> = p.delete_blobs.iter().map(|(k, _)| k.clone()).collect();
    let done = delete_all(store, &blob_keys, workers, "unreferenced blobs");
    let (n, failed) = tally(blob_keys.len(), &done);
    s.blobs_deleted = n;
    s.errors += failed;
    s.bytes_freed = p
        .delete_blobs
        .chunks(DELETE_BATCH_KEYS)
        .zip(&done)
        .filter(|(_, ok)| **ok)
        .flat_map(|(batch, _)| batch.iter().map(|(_, size)| size))
        .sum();
    let done = delete_all(store, &p.delete_marks, workers, "gc marks");
    let (n, failed) = tally(p.delete_marks.len(), &done);
    s.marks_deleted = n;
    s.errors += failed;
    let aborted = parallel(&p.abort_uploads, workers, |u| store.abort_upload(u));
    for (u, r) in p.abort_uploads.iter().zip(aborted) {
        match r {
            Ok(()) => s.uploads_aborted += 1,
            Err(e) => {
                s.errors += 1;
                log::error!(
                    "aborting multipart upload {} of {}: {e}",
                    u.upload_id,
                    u.key
                );
            }
        }
    }
    // A record of nothing checks nothing: an empty store is left empty.
    let recorded = p.record.manifests_kept > 0;
    if let Err(e) = recorded
        .then(|| store.put(keys::GC_PASS_KEY, &p.record.to_bytes()))
        .transpose()
    {
        s.errors += 1;
        log::error!("writing the pass record: {e}");
    }
    s
}

/// One whole pass: plan, then execute (or print, with `dry_run`).
pub fn run(
    store: &dyn ImageStore,
    policy: &Policy,
    workers: usize,
    dry_run: bool,
) -> Result<Summary, Stop> {
    let started = Instant::now();
    let before = store.requests_sent();
    let p = plan_pass(store, policy, workers)?;
    let mut s = execute(store, &p, workers, dry_run);
    s.seconds = started.elapsed().as_secs_f64();
    s.requests = store.requests_sent().zip(before).map(|(a, b)| a - b);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_the_batches_that_went_through() {
        let n = 2 * DELETE_BATCH_KEYS + 5;
        assert_eq!(tally(n, &[true, true, true]), (n as u64, 0));
        assert_eq!(
            tally(n, &[true, false, true]),
            (DELETE_BATCH_KEYS as u64 + 5, 1)
        );
        assert_eq!(tally(0, &[]), (0, 0));
    }

    #[test]
    fn parallel_keeps_the_order() {
        let items: Vec<u32> = (0..100).collect();
        assert_eq!(
            parallel(&items, 7, |x| x * 2),
            items.iter().map(|x| x * 2).collect::<Vec<_>>()
        );
        assert!(parallel(&Vec::<u32>::new(), 4, |x| *x).is_empty());
    }
}
