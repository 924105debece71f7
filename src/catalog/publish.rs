//! Publishing a manifest: the one place that decides "generation g+1 is ours, or we are
//! fenced" (DESIGN §3, docs/FORMAT.md *Checkpoint* step 4 and *Garbage collection*).
//!
//! [`publish_next`] builds the next manifest from its base with an [`Edit`], checks it, and
//! creates it with a conditional create at the first free generation. After a create
//! succeeds it confirms, with one LIST of the image's manifests (limit 1), that nothing
//! newer exists: a garbage collector may have deleted generation g+1 after another writer
//! took the image over and wrote above it, and then a fenced writer's create of g+1 succeeds
//! although the image is no longer its own. Without the check that writer would drop WAL
//! data nobody can see. Found newer: fenced, as if the create had failed.

use super::keys;
use super::manifest::{self, LayerRef, Manifest, ManifestError, Newest};
use crate::store::ImageStore;
use std::collections::HashSet;

/// Conditional creates one [`publish_next`] tries when it may retry on top of a newer state
/// ([`Conflict::Rebase`], [`Conflict::RetryWhileUnchanged`]) before it gives up.
pub const PUBLISH_ATTEMPTS_MAX: u32 = 5;

/// LISTs that confirm a created manifest is the newest, before the publish fails (each is
/// already retried by the store). A publish that cannot be confirmed fails; the writer's
/// next attempt then finds its own generation taken and stops as fenced, which keeps its
/// WAL (a restart resumes from it): never a WAL entry dropped on an unconfirmed publish.
pub const CONFIRM_ATTEMPTS_MAX: u32 = 3;

/// How the next manifest is made from its base (the newest complete manifest, if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// A checkpoint: `layers` on top of the base's, change count raised to `change_count`.
    Append {
        change_count: u64,
        layers: Vec<LayerRef>,
    },
    /// A compaction step: the base's layers merged or reordered, as the new list (oldest
    /// first).
    SetLayers(Vec<LayerRef>),
    /// Layers that newer layers cover entirely, taken out.
    Drop(HashSet<String>),
    /// The base again at a free generation: a bridge above cut-short objects.
    Copy,
    /// A new owner: the base's layers and change count (no base: an empty image) under
    /// `writer_id`.
    TakeOver {
        image_id: String,
        page_size_bits: u32,
        writer_id: u128,
    },
    /// A whole manifest, for test fixtures that write an image without a session.
    Whole(Manifest),
}

/// What a conditional create that finds the generation taken (or a newer manifest above
/// the one it created) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Another writer owns the image now: fenced (checkpoints, compactions).
    Fence,
    /// Re-read the newest manifest and apply the edit on top of it (a takeover).
    Rebase,
    /// Retry above the taken generations as long as the newest complete manifest is still
    /// the base; any other manifest means another writer took over: fenced (a bridge).
    RetryWhileUnchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Created, and confirmed to be the image's newest manifest.
    Published(Manifest),
    /// Another writer holds `generation` or a newer one (`newest`, if known).
    Fenced { generation: u64, newest: u64 },
    /// [`PUBLISH_ATTEMPTS_MAX`] attempts each lost a race; nothing of ours is the newest.
    GaveUp { attempts: u32 },
}

impl Edit {
    /// The next manifest's content on top of `base` (generation and time set by the caller).
    fn apply(&self, base: Option<&Manifest>) -> Result<Manifest, ManifestError> {
        let need_base = || {
            base.cloned().ok_or_else(|| ManifestError::Invalid {
                key: String::new(),
                why: format!("{self:?} needs a manifest to build on"),
            })
        };
        let mut m = match self {
            Edit::Whole(m) => m.clone(),
            Edit::TakeOver {
                image_id,
                page_size_bits,
                writer_id,
            } => {
                let (change_count, layers) = base
                    .map(|b| (b.change_count, b.layers.clone()))
                    .unwrap_or_default();
                Manifest {
                    format_version: manifest::MANIFEST_FORMAT_VERSION,
                    image_id: image_id.clone(),
                    generation: 0,
                    change_count,
                    writer_id: manifest::writer_id_hex(*writer_id),
                    page_size_bits: *page_size_bits,
                    layers,
                    created_at_unix: 0,
                }
            }
            Edit::Copy => need_base()?,
            Edit::Append {
                change_count,
                layers,
            } => {
                let mut m = need_base()?;
                m.change_count = *change_count;
                m.layers.extend(layers.iter().cloned());
                m
            }
            Edit::SetLayers(layers) => {
                let mut m = need_base()?;
                m.layers = layers.clone();
                m
            }
            Edit::Drop(gone) => {
                let mut m = need_base()?;
                m.layers.retain(|l| !gone.contains(&l.blob_id));
                m
            }
        };
        m.created_at_unix = keys::now_unix_ms() / 1000;
        Ok(m)
    }
}

/// Creates the manifest `edit` makes of `base` at generation `base.taken_generation + 1`
/// with a conditional create, then confirms that it is the newest; `conflict` says what a
/// lost race means. Every manifest is checked before it is created ([`Manifest::check`],
/// [`Manifest::check_successor`]), and so is the bound on new blobs' age
/// ([`super::publish_bound`]): a blob named for the first time must have begun its upload
/// less than that long ago (otherwise [`ManifestError::StaleBlob`]; upload it again).
pub fn publish_next(
    store: &dyn ImageStore,
    base: &Newest,
    edit: &Edit,
    conflict: Conflict,
) -> Result<Outcome, ManifestError> {
    let mut base = base.clone();
    for _ in 0..PUBLISH_ATTEMPTS_MAX {
        let mut next = edit.apply(base.manifest.as_ref())?;
        next.generation = base.next_generation();
        if let Some(b) = &base.manifest {
            next.check_successor(b)?;
        }
        check_new_blobs_fresh(base.manifest.as_ref(), &next)?;
        let created = manifest::create(store, &next)?;
        let image = next.image_id.clone();
        if created {
            let newest = confirm_newest(store, &next)?;
            if newest == Some(next.generation) {
                return Ok(Outcome::Published(next));
            }
            if newest < Some(next.generation) {
                return Err(vanished(&next, "right after it was created"));
            }
            log::warn!(
                "image {image}: manifest generation {} was created, but generation {} exists \
                 above it: that generation had been collected, and another writer owns the \
                 image",
                next.generation,
                newest.unwrap_or(0)
            );
        }
        if conflict == Conflict::Fence {
            let newest = newest_generation(store, &image)?.unwrap_or(0);
            return Ok(Outcome::Fenced {
                generation: next.generation,
                newest,
            });
        }
        let newest = manifest::load_newest(store, &image)?;
        if newest.taken_generation < next.generation {
            return Err(vanished(&next, "after its create was refused"));
        }
        if conflict == Conflict::RetryWhileUnchanged {
            if newest.manifest != base.manifest {
                return Ok(Outcome::Fenced {
                    generation: next.generation,
                    newest: newest.manifest.map(|m| m.generation).unwrap_or(0),
                });
            }
            base.taken_generation = newest.taken_generation;
        } else {
            base = newest;
        }
    }
    Ok(Outcome::GaveUp {
        attempts: PUBLISH_ATTEMPTS_MAX,
    })
}

/// The newest generation after `created` was created: [`newest_generation`], tried up to
/// [`CONFIRM_ATTEMPTS_MAX`] times.
fn confirm_newest(
    store: &dyn ImageStore,
    created: &Manifest,
) -> Result<Option<u64>, ManifestError> {
    let mut attempt = 1;
    loop {
        match newest_generation(store, &created.image_id) {
            Ok(g) => return Ok(g),
            Err(e) if attempt >= CONFIRM_ATTEMPTS_MAX => {
                log::error!(
                    "image {}: manifest generation {} was created, but whether it is the \
                     newest could not be confirmed ({e}); the checkpoint fails",
                    created.image_id,
                    created.generation
                );
                return Err(e);
            }
            Err(e) => {
                log::warn!("confirming manifest {}: {e} (retrying)", created.key());
                attempt += 1;
            }
        }
    }
}

/// The generation of the image's newest manifest key (one LIST, limit 1).
fn newest_generation(store: &dyn ImageStore, image_id: &str) -> Result<Option<u64>, ManifestError> {
    let listed = store.list(&keys::manifest_prefix(image_id), Some(1))?;
    match listed.first() {
        None => Ok(None),
        Some(o) => keys::generation_of_manifest_key(&o.key)
            .map(Some)
            .ok_or_else(|| ManifestError::Invalid {
                key: o.key.clone(),
                why: "not a manifest key (expected 16 hex digits and .json)".into(),
            }),
    }
}

fn vanished(m: &Manifest, when: &str) -> ManifestError {
    ManifestError::Invalid {
        key: m.key(),
        why: format!(
            "generation {} vanished {when}: something deletes manifests it should not \
             (a garbage collector with a broken configuration?)",
            m.generation
        ),
    }
}

/// The publish side of the garbage collector's bound: every blob `next` names that `base`
/// does not began its upload (the time in its ULID) less than [`super::publish_bound`] ago.
fn check_new_blobs_fresh(base: Option<&Manifest>, next: &Manifest) -> Result<(), ManifestError> {
    let old: HashSet<&str> = base
        .map(|b| b.layers.iter().map(|l| l.blob_id.as_str()).collect())
        .unwrap_or_default();
    let bound_ms = super::publish_bound().as_millis() as u64;
    let now_ms = keys::now_unix_ms();
    for l in next
        .layers
        .iter()
        .filter(|l| !old.contains(l.blob_id.as_str()))
    {
        let created = keys::blob_created_unix_ms(&l.blob_id).unwrap_or(0);
        let age_ms = now_ms.saturating_sub(created);
        if age_ms > bound_ms {
            return Err(ManifestError::StaleBlob {
                image: next.image_id.clone(),
                blob_id: l.blob_id.clone(),
                age_ms,
                bound_ms,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;
    use crate::store::ImageStore;

    const IMAGE: &str = "p.mvps-image";

    fn takeover(writer: u128) -> Edit {
        Edit::TakeOver {
            image_id: IMAGE.into(),
            page_size_bits: 12,
            writer_id: writer,
        }
    }

    fn layer(id: String) -> LayerRef {
        LayerRef {
            blob_id: id,
            size_bytes: 1,
            data_pages: 1,
        }
    }

    fn published(o: Outcome) -> Manifest {
        match o {
            Outcome::Published(m) => m,
            other => panic!("not published: {other:?}"),
        }
    }

    fn newest(s: &dyn ImageStore) -> Newest {
        manifest::load_newest(s, IMAGE).unwrap()
    }

    #[test]
    fn checkpoint_then_fenced_by_a_takeover() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let a = published(publish_next(&s, &newest(&s), &takeover(1), Conflict::Rebase).unwrap());
        assert_eq!((a.generation, a.layers.len()), (1, 0));
        let edit = Edit::Append {
            change_count: 3,
            layers: vec![layer(keys::new_blob_id())],
        };
        let a2 =
            published(publish_next(&s, &Newest::of(a.clone()), &edit, Conflict::Fence).unwrap());
        assert_eq!((a2.generation, a2.change_count), (2, 3));
        let b = published(publish_next(&s, &newest(&s), &takeover(2), Conflict::Rebase).unwrap());
        assert_eq!((b.generation, &b.layers), (3, &a2.layers));
        // A, still at generation 2, is fenced.
        let edit = Edit::Append {
            change_count: 4,
            layers: vec![layer(keys::new_blob_id())],
        };
        let o = publish_next(&s, &Newest::of(a2.clone()), &edit, Conflict::Fence).unwrap();
        assert_eq!(
            o,
            Outcome::Fenced {
                generation: 3,
                newest: 3
            }
        );
        // A collector deletes generation 3 after B wrote above it: A's create of 3 succeeds,
        // but A is fenced all the same.
        let b2 = published(
            publish_next(&s, &Newest::of(b.clone()), &Edit::Copy, Conflict::Fence).unwrap(),
        );
        s.delete(&b.key()).unwrap();
        let o = publish_next(&s, &Newest::of(a2), &edit, Conflict::Fence).unwrap();
        assert_eq!(
            o,
            Outcome::Fenced {
                generation: 3,
                newest: b2.generation
            }
        );
        // A takeover over that stray manifest lands above everything.
        let c = published(publish_next(&s, &newest(&s), &takeover(3), Conflict::Rebase).unwrap());
        assert_eq!(c.generation, b2.generation + 1);
    }

    #[test]
    fn invariants_are_checked_before_create() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let a = published(publish_next(&s, &newest(&s), &takeover(1), Conflict::Rebase).unwrap());
        let id = keys::new_blob_id();
        let twice = Edit::Append {
            change_count: 1,
            layers: vec![layer(id.clone()), layer(id)],
        };
        let e = publish_next(&s, &Newest::of(a.clone()), &twice, Conflict::Fence).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let back = Edit::Append {
            change_count: 0,
            layers: vec![],
        };
        let mut high = a.clone();
        high.change_count = 5;
        let e = publish_next(&s, &Newest::of(high), &back, Conflict::Fence).unwrap_err();
        assert!(e.to_string().contains("below its base"), "{e}");
        // A blob named for the first time long after its upload began: refused.
        let old = keys::new_blob_id_at(keys::now_unix_ms() - 3_600_000);
        let stale = Edit::Append {
            change_count: 1,
            layers: vec![layer(old)],
        };
        let e = publish_next(&s, &Newest::of(a.clone()), &stale, Conflict::Fence).unwrap_err();
        assert!(matches!(e, ManifestError::StaleBlob { .. }), "{e}");
        // Nothing was created by any of these.
        assert_eq!(newest(&s).taken_generation, 1);
        let small_pages = Edit::TakeOver {
            image_id: IMAGE.into(),
            page_size_bits: 9,
            writer_id: 2,
        };
        let e = publish_next(&s, &Newest::of(a), &small_pages, Conflict::Rebase);
        assert!(e.is_err_and(|e| e.to_string().contains("page_size_bits")));
    }

    #[test]
    fn merges_and_drops_keep_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let ids: Vec<String> = (0..4).map(|_| keys::new_blob_id()).collect();
        let a = published(publish_next(&s, &newest(&s), &takeover(1), Conflict::Rebase).unwrap());
        let edit = Edit::Append {
            change_count: 1,
            layers: ids.iter().cloned().map(layer).collect(),
        };
        let a = published(publish_next(&s, &Newest::of(a), &edit, Conflict::Fence).unwrap());
        let merged = keys::new_blob_id();
        let mut layers = a.layers.clone();
        layers.splice(1..3, [layer(merged.clone())]);
        let edit = Edit::SetLayers(layers);
        let b = published(publish_next(&s, &Newest::of(a), &edit, Conflict::Fence).unwrap());
        let order: Vec<&str> = b.layers.iter().map(|l| l.blob_id.as_str()).collect();
        assert_eq!(order, [&ids[0], &merged, &ids[3]]);
        let edit = Edit::Drop(HashSet::from([ids[0].clone()]));
        let c = published(publish_next(&s, &Newest::of(b), &edit, Conflict::Fence).unwrap());
        assert_eq!(c.layers.len(), 2);
        assert_eq!(newest(&s).manifest, Some(c));
    }
}
