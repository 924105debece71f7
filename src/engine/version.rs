//! The version: the image's newest manifest and its opened layers, which reads consult below
//! the buffer, and the publication of the next manifest. Checkpoints (which append layers)
//! and compactions (which replace them) publish one at a time, each on top of the newest
//! manifest, through the catalog (`catalog::publish_next`, a conditional create of g+1).
//!
//! The manifest and its layers change together under one lock, so that what reads see and
//! what the store lists never disagree. Also kept here: the debt of the newest manifest as
//! compaction last measured it, which paces writes.

use super::debt::Debt;
use super::layer::Layer;
use super::manifest::Manifest;
use super::Error;
use crate::catalog::{self, Conflict, Edit, Outcome};
use crate::store::ImageStore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// The newest manifest and its layers.
pub struct Current {
    /// None: never published (image store writes disabled).
    pub manifest: Option<Manifest>,
    /// The manifest's layers, opened, newest first (the manifest lists them oldest first).
    pub layers: Vec<Arc<Layer>>,
}

pub struct Version {
    image_id: String,
    current: RwLock<Current>,
    /// Held while a manifest is published: its base stays the newest until it is installed.
    publishing: Mutex<()>,
    debt: Mutex<Debt>,
}

/// What `publish` ended with when it did not publish.
pub enum Refusal {
    /// Another buffer store wrote this generation or a newer one.
    Fenced {
        generation: u64,
    },
    Failed(Error),
}

impl Version {
    pub fn new(image_id: &str, manifest: Option<Manifest>, layers: Vec<Arc<Layer>>) -> Version {
        debug_assert!(manifest.as_ref().is_none_or(|m| m
            .layers
            .iter()
            .rev()
            .map(|r| &r.blob_id)
            .eq(layers.iter().map(|l| &l.blob_id))));
        Version {
            image_id: image_id.to_string(),
            current: RwLock::new(Current { manifest, layers }),
            publishing: Mutex::new(()),
            debt: Mutex::new(Debt::default()),
        }
    }

    /// The newest manifest (None: never published).
    pub fn manifest(&self) -> Option<Manifest> {
        self.current.read().unwrap().manifest.clone()
    }

    /// The layers, newest first.
    pub fn layers(&self) -> Vec<Arc<Layer>> {
        self.current.read().unwrap().layers.clone()
    }

    /// The layers under the read lock (reads resolve pages through them without a copy).
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap()
    }

    /// Taken before `publish` and held until it returns (lock order: see `engine`).
    pub fn lock_publishing(&self) -> MutexGuard<'_, ()> {
        self.publishing.lock().unwrap()
    }

    /// Publishes the manifest `edit` makes of the newest one as generation g+1 and makes it
    /// current, with `opened` (the layers it adds, opened) and the kept layers. The caller
    /// holds `lock_publishing` and took `base` under it.
    pub fn publish(
        &self,
        _publishing: &MutexGuard<'_, ()>,
        store: &dyn ImageStore,
        base: &Manifest,
        edit: &Edit,
        opened: Vec<Arc<Layer>>,
    ) -> std::result::Result<Manifest, Refusal> {
        let newest = catalog::manifest::Newest::of(base.clone());
        let outcome =
            catalog::publish_next(store, &newest, edit, Conflict::Fence).map_err(|source| {
                Refusal::Failed(Error::Manifest {
                    image: self.image_id.clone(),
                    source,
                })
            })?;
        let next = match outcome {
            Outcome::Published(next) => next,
            Outcome::Fenced { generation, .. } => return Err(Refusal::Fenced { generation }),
            Outcome::GaveUp { .. } => unreachable!("Conflict::Fence never retries"),
        };
        self.install(base, &next, opened);
        Ok(next)
    }

    /// Makes `next` (published on top of `base`) current: its layers are `opened` or ones
    /// `base` had.
    fn install(&self, base: &Manifest, next: &Manifest, opened: Vec<Arc<Layer>>) {
        let mut cur = self.current.write().unwrap();
        debug_assert_eq!(
            cur.manifest.as_ref().map(|m| m.generation),
            Some(base.generation),
            "image {}: published on the newest manifest",
            self.image_id
        );
        let mut by_id: HashMap<&str, Arc<Layer>> = cur
            .layers
            .iter()
            .map(|l| (l.blob_id.as_str(), l.clone()))
            .collect();
        for l in &opened {
            by_id.insert(l.blob_id.as_str(), l.clone());
        }
        let layers = next
            .layers
            .iter()
            .rev()
            .map(|r| by_id[r.blob_id.as_str()].clone())
            .collect();
        drop(by_id);
        cur.layers = layers;
        cur.manifest = Some(next.clone());
    }

    /// The debt of the newest manifest, as last measured.
    pub fn debt(&self) -> Debt {
        *self.debt.lock().unwrap()
    }

    pub fn lock_debt(&self) -> MutexGuard<'_, Debt> {
        self.debt.lock().unwrap()
    }
}

impl Refusal {
    pub fn into_error(self, image: &str) -> Error {
        match self {
            Refusal::Fenced { .. } => Error::Fenced {
                image: image.to_string(),
            },
            Refusal::Failed(e) => e,
        }
    }
}
