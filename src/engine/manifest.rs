//! Manifests: one JSON object per image version, never modified (docs/FORMAT.md §Manifest).
//!
//! Fencing (DESIGN §3): generation g+1 is written with a conditional create on top of the
//! generation g the writer last saw. `AlreadyExists` means another writer took the image over.

use crate::store::{self, keys, CreateOutcome, ImageStore};
use serde::{Deserialize, Serialize};

pub const MANIFEST_FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    pub blob_id: String,
    pub size_bytes: u64,
    pub data_pages: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub image_id: String,
    pub generation: u64,
    /// Committed write transactions folded into this version's layers.
    pub change_count: u64,
    /// Hex of the 128-bit id of the buffer store that wrote this version.
    pub writer_id: String,
    pub page_size_bits: u32,
    /// Oldest first; later layers shadow earlier ones.
    pub layers: Vec<LayerRef>,
    pub created_at_unix: u64,
}

#[derive(Debug)]
pub enum ManifestError {
    Store(store::Error),
    /// The object exists but is not a manifest we can read.
    Invalid {
        key: String,
        why: String,
    },
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestError::Store(e) => write!(f, "{e}"),
            ManifestError::Invalid { key, why } => write!(f, "manifest {key}: {why}"),
        }
    }
}

impl From<store::Error> for ManifestError {
    fn from(e: store::Error) -> Self {
        ManifestError::Store(e)
    }
}

pub fn writer_id_hex(id: u128) -> String {
    format!("{id:032x}")
}

impl Manifest {
    pub fn key(&self) -> String {
        keys::manifest_key(&self.image_id, self.generation)
    }

    /// Checks the invariants a manifest must satisfy before it is written or used.
    pub fn check(&self, key: &str) -> Result<(), ManifestError> {
        let bad = |why: String| {
            Err(ManifestError::Invalid {
                key: key.to_string(),
                why,
            })
        };
        if self.format_version != MANIFEST_FORMAT_VERSION {
            return bad(format!(
                "format version {} is not supported",
                self.format_version
            ));
        }
        if keys::generation_of_manifest_key(key) != Some(self.generation) {
            return bad(format!(
                "generation {} does not match the key",
                self.generation
            ));
        }
        if !keys::is_valid_image_id(&self.image_id) {
            return bad("bad image id".into());
        }
        if let Some(l) = self
            .layers
            .iter()
            .find(|l| !keys::is_valid_blob_id(&l.blob_id))
        {
            return bad(format!("bad blob id {:?}", l.blob_id));
        }
        Ok(())
    }
}

/// The newest manifest of an image, or None for an image never written.
pub fn load_latest(
    store: &dyn ImageStore,
    image_id: &str,
) -> Result<Option<Manifest>, ManifestError> {
    let listed = store.list(&keys::manifest_prefix(image_id), Some(1))?;
    let Some(first) = listed.first() else {
        return Ok(None);
    };
    let bytes = store.get(&first.key)?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| ManifestError::Invalid {
        key: first.key.clone(),
        why: e.to_string(),
    })?;
    m.check(&first.key)?;
    if m.image_id != image_id {
        return Err(ManifestError::Invalid {
            key: first.key.clone(),
            why: "image id mismatch".into(),
        });
    }
    Ok(Some(m))
}

/// Writes `m` with a conditional create. Ok(false): fenced (someone wrote that generation).
pub fn create(store: &dyn ImageStore, m: &Manifest) -> Result<bool, ManifestError> {
    let key = m.key();
    m.check(&key)?;
    let body = serde_json::to_vec_pretty(m).expect("manifests serialize");
    Ok(store.create_if_absent(&key, &body)? == CreateOutcome::Created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;

    fn m(gen: u64) -> Manifest {
        Manifest {
            format_version: 1,
            image_id: "m.mvps-image".into(),
            generation: gen,
            change_count: gen * 10,
            writer_id: writer_id_hex(7),
            page_size_bits: 12,
            layers: vec![],
            created_at_unix: 0,
        }
    }

    #[test]
    fn latest_and_fencing() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        assert_eq!(load_latest(&s, "m.mvps-image").unwrap(), None);
        assert!(create(&s, &m(1)).unwrap());
        assert!(create(&s, &m(2)).unwrap());
        assert!(
            !create(&s, &m(2)).unwrap(),
            "second create of a generation is fenced"
        );
        assert_eq!(load_latest(&s, "m.mvps-image").unwrap(), Some(m(2)));
        let mut bad = m(3);
        bad.layers.push(LayerRef {
            blob_id: "../../x".into(),
            size_bytes: 0,
            data_pages: 0,
        });
        assert!(create(&s, &bad).is_err());
    }
}
