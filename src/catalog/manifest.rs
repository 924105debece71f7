//! Manifests: one JSON object per image version, never modified (docs/FORMAT.md §Manifest).
//!
//! Fencing (DESIGN §3): generation g+1 is written with a conditional create on top of the
//! generation g the writer last saw; [`super::publish`] does that. Every manifest is checked
//! ([`Manifest::check`]) before it is created and after it is read.

use super::keys;
use crate::store::{self, CreateOutcome, ImageStore};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

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
    /// A manifest about to be published names a blob whose upload started too long ago for
    /// the garbage collector's bound (docs/FORMAT.md, *Garbage collection*): the blob may be
    /// collected as unreferenced, so it must be uploaded again under a new id.
    StaleBlob {
        image: String,
        blob_id: String,
        age_ms: u64,
        bound_ms: u64,
    },
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestError::Store(e) => write!(f, "{e}"),
            ManifestError::Invalid { key, why } => write!(f, "manifest {key}: {why}"),
            ManifestError::StaleBlob {
                image,
                blob_id,
                age_ms,
                bound_ms,
            } => write!(
                f,
                "image {image}: blob {blob_id} was uploaded {age_ms} ms ago, more than the \
                 {bound_ms} ms a new blob may wait for its manifest (half the garbage \
                 collector's minimum blob age); not published, it is written again"
            ),
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
        let mut seen = HashSet::with_capacity(self.layers.len());
        if let Some(l) = self.layers.iter().find(|l| !seen.insert(&l.blob_id)) {
            return bad(format!("blob {} is listed twice", l.blob_id));
        }
        if u128::from_str_radix(&self.writer_id, 16).is_err() || self.writer_id.len() != 32 {
            return bad(format!("bad writer id {:?}", self.writer_id));
        }
        Ok(())
    }

    /// Checks that `self` may follow `base` (the manifest it was built on): same image and
    /// page size, a change count that does not go back.
    pub fn check_successor(&self, base: &Manifest) -> Result<(), ManifestError> {
        let why = if self.image_id != base.image_id {
            format!("image id {:?} differs from its base's", self.image_id)
        } else if self.page_size_bits != base.page_size_bits {
            format!(
                "page_size_bits {} differs from its base's {}",
                self.page_size_bits, base.page_size_bits
            )
        } else if self.change_count < base.change_count {
            format!(
                "change count {} is below its base's {}",
                self.change_count, base.change_count
            )
        } else {
            return Ok(());
        };
        Err(ManifestError::Invalid {
            key: self.key(),
            why,
        })
    }

    /// The JSON bytes this manifest is stored as.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifests serialize")
    }
}

/// What a manifest object holds, as a reader classifies it (docs/FORMAT.md, *Cut-short
/// manifest objects*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// A valid manifest of the image its key names.
    Manifest(Manifest),
    /// Empty, or a JSON text ending mid-document: a create nobody got a success answer for.
    CutShort,
}

/// Parses and checks the bytes of the manifest object at `key`. Anything that is neither a
/// valid manifest of the image the key names nor cut short is an error naming the object.
pub fn parse(key: &str, bytes: &[u8]) -> Result<Read, ManifestError> {
    let m: Manifest = match serde_json::from_slice(bytes) {
        Ok(m) => m,
        Err(_) if is_cut_short(bytes) => return Ok(Read::CutShort),
        Err(e) => {
            return Err(ManifestError::Invalid {
                key: key.to_string(),
                why: format!(
                    "{} bytes that are not a manifest ({e}), nor a write cut short (those are \
                     empty or end mid-document): the object is damaged. It is not skipped, as \
                     falling back to an older manifest could undo checkpointed writes; restore \
                     it or inspect the image's manifests",
                    bytes.len()
                ),
            })
        }
    };
    m.check(key)?;
    match keys::parse_manifest_key(key) {
        Some((image_id, _)) if image_id == m.image_id => Ok(Read::Manifest(m)),
        _ => Err(ManifestError::Invalid {
            key: key.to_string(),
            why: format!("image id {:?} does not match the key", m.image_id),
        }),
    }
}

/// Cut-short manifest objects [`load_newest`] skips in a row before it gives up. One is the
/// trace of one writer killed mid-PUT; many in a row mean something else is wrong.
pub const CUT_SHORT_MANIFESTS_MAX: usize = 16;

/// The newest manifests of an image, as [`load_newest`] found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Newest {
    /// The newest complete manifest; None for an image never written.
    pub manifest: Option<Manifest>,
    /// Keys of the cut-short manifest objects above it, newest first (usually none).
    pub cut_short: Vec<String>,
    /// The highest generation whose key is taken, by `manifest` or by a cut-short object
    /// (0 if none). A conditional create of any generation up to it fails, so the next
    /// manifest is this + 1.
    pub taken_generation: u64,
}

impl Newest {
    /// What a writer that holds `m` knows: it is the newest, nothing above it.
    pub fn of(m: Manifest) -> Newest {
        Newest {
            taken_generation: m.generation,
            manifest: Some(m),
            cut_short: Vec::new(),
        }
    }

    /// The generation the next manifest must have.
    pub fn next_generation(&self) -> u64 {
        self.taken_generation + 1
    }
}

/// Whether `bytes`, which are not a manifest, are what a manifest PUT cut short leaves: nothing
/// at all, or a JSON text that ends before its value does. A manifest we write is never empty,
/// and a complete one always parses, so neither can be a manifest anyone got a success answer
/// for (docs/FORMAT.md, *Cut-short manifest objects*). Anything else (bad syntax, a complete
/// document that is not a manifest) is damage, not a cut, and is never skipped.
pub fn is_cut_short(bytes: &[u8]) -> bool {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(_) => false,
        Err(e) => e.classify() == serde_json::error::Category::Eof,
    }
}

/// Reads and checks the manifest at `key`: Ok(None) if the object is cut short.
fn read_manifest(store: &dyn ImageStore, key: &str) -> Result<Option<Manifest>, ManifestError> {
    match parse(key, &store.get(key)?)? {
        Read::Manifest(m) => Ok(Some(m)),
        Read::CutShort => Ok(None),
    }
}

/// The newest manifest of an image, skipping cut-short objects above it (see [`Newest`]).
///
/// The common case costs one LIST (one key) and one GET. Only when the newest object is cut
/// short are up to [`CUT_SHORT_MANIFESTS_MAX`] more keys listed and read, newest first, until
/// one is a complete manifest. A manifest that is damaged in any other way is an error naming
/// its key, and so is a run of more than [`CUT_SHORT_MANIFESTS_MAX`] cut-short objects.
pub fn load_newest(store: &dyn ImageStore, image_id: &str) -> Result<Newest, ManifestError> {
    let prefix = keys::manifest_prefix(image_id);
    let listed = store.list(&prefix, Some(1))?;
    let Some(first) = listed.first() else {
        return Ok(Newest {
            manifest: None,
            cut_short: Vec::new(),
            taken_generation: 0,
        });
    };
    let generation = |key: &str| {
        keys::generation_of_manifest_key(key).ok_or_else(|| ManifestError::Invalid {
            key: key.to_string(),
            why: "not a manifest key (expected 16 hex digits and .json)".into(),
        })
    };
    let taken_generation = generation(&first.key)?;
    if let Some(m) = read_manifest(store, &first.key)? {
        return Ok(Newest {
            manifest: Some(m),
            cut_short: Vec::new(),
            taken_generation,
        });
    }
    // Rare: the newest object is cut short. Look further down.
    let listed = store.list(&prefix, Some(CUT_SHORT_MANIFESTS_MAX + 1))?;
    let mut cut_short = Vec::new();
    for o in &listed {
        generation(&o.key)?;
        if let Some(m) = read_manifest(store, &o.key)? {
            return Ok(Newest {
                manifest: Some(m),
                cut_short,
                taken_generation,
            });
        }
        cut_short.push(o.key.clone());
        if cut_short.len() > CUT_SHORT_MANIFESTS_MAX {
            return Err(ManifestError::Invalid {
                key: first.key.clone(),
                why: format!(
                    "this and the next {CUT_SHORT_MANIFESTS_MAX} older manifest objects are \
                     all cut short (empty or ending mid-document); refusing to look further"
                ),
            });
        }
    }
    // Nothing but cut-short objects: no manifest was ever completed.
    Ok(Newest {
        manifest: None,
        cut_short,
        taken_generation,
    })
}

/// The newest complete manifest of an image, or None for an image never written (see
/// [`load_newest`]; a writer needs [`Newest::next_generation`] too).
pub fn load_latest(
    store: &dyn ImageStore,
    image_id: &str,
) -> Result<Option<Manifest>, ManifestError> {
    load_newest(store, image_id).map(|n| n.manifest)
}

/// Writes `m` with a conditional create. Ok(false): the key is taken. Only
/// [`super::publish`] calls it (and this module's tests).
pub(super) fn create(store: &dyn ImageStore, m: &Manifest) -> Result<bool, ManifestError> {
    let key = m.key();
    m.check(&key)?;
    Ok(store.create_if_absent(&key, &m.to_bytes())? == CreateOutcome::Created)
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

    fn plant(s: &LocalStore, gen: u64, bytes: &[u8]) -> String {
        let key = keys::manifest_key("m.mvps-image", gen);
        assert_eq!(
            s.create_if_absent(&key, bytes).unwrap(),
            CreateOutcome::Created
        );
        key
    }

    #[test]
    fn cut_short_is_empty_or_a_prefix() {
        let full = serde_json::to_vec_pretty(&m(3)).unwrap();
        assert!(!is_cut_short(&full));
        for n in 0..full.len() {
            assert!(is_cut_short(&full[..n]), "prefix of {n} bytes");
        }
        for damaged in [
            &b"{]"[..],
            b"x",
            b"{\"a\": 1}}",
            b"null",
            b"{}",
            b"\x00\x00",
        ] {
            assert!(!is_cut_short(damaged), "{damaged:?}");
        }
        let mut flipped = full.clone();
        flipped[full.len() / 2] = b'}';
        assert!(!is_cut_short(&flipped));
    }

    /// Cut-short objects above the newest manifest are skipped, but their generations stay
    /// taken; a damaged one is an error naming it; so is a run longer than the limit.
    #[test]
    fn newest_skips_cut_short_objects_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        assert!(create(&s, &m(1)).unwrap());
        assert!(create(&s, &m(2)).unwrap());
        let n = load_newest(&s, "m.mvps-image").unwrap();
        assert_eq!((&n.manifest, n.taken_generation), (&Some(m(2)), 2));
        assert_eq!(n.next_generation(), 3);

        let empty = plant(&s, 3, b"");
        let full = serde_json::to_vec_pretty(&m(4)).unwrap();
        let prefix = plant(&s, 4, &full[..full.len() / 3]);
        let n = load_newest(&s, "m.mvps-image").unwrap();
        assert_eq!(n.manifest, Some(m(2)));
        assert_eq!(n.cut_short, vec![prefix, empty]);
        assert_eq!(n.next_generation(), 5);
        assert_eq!(load_latest(&s, "m.mvps-image").unwrap(), Some(m(2)));
        // Generations 3 and 4 stay taken: a conditional create of them fails.
        assert!(!create(&s, &m(3)).unwrap());
        assert!(create(&s, &m(5)).unwrap());
        assert_eq!(load_latest(&s, "m.mvps-image").unwrap(), Some(m(5)));

        // Damage is not a cut: refused, naming the object.
        let bad = plant(&s, 6, b"{\"format_version\": 1,, }");
        let e = load_newest(&s, "m.mvps-image").unwrap_err().to_string();
        assert!(e.contains(&bad) && e.contains("damaged"), "{e}");
        // ... also when it lies below a cut-short object.
        plant(&s, 7, b"");
        let e = load_newest(&s, "m.mvps-image").unwrap_err().to_string();
        assert!(e.contains(&bad) && e.contains("damaged"), "{e}");
    }

    #[test]
    fn only_cut_short_objects_mean_no_manifest_yet() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        plant(&s, 1, b"");
        let n = load_newest(&s, "m.mvps-image").unwrap();
        assert_eq!((n.manifest, n.taken_generation), (None, 1));
        assert_eq!(n.cut_short.len(), 1);
        let max = CUT_SHORT_MANIFESTS_MAX as u64;
        for g in 2..=max {
            plant(&s, g, b"");
        }
        let n = load_newest(&s, "m.mvps-image").unwrap();
        assert_eq!(n.cut_short.len(), CUT_SHORT_MANIFESTS_MAX);
        assert_eq!((&n.manifest, n.next_generation()), (&None, max + 1));
        assert!(create(&s, &m(1)).is_ok_and(|created| !created));
        plant(&s, max + 1, b"");
        let e = load_newest(&s, "m.mvps-image").unwrap_err().to_string();
        assert!(e.contains("all cut short"), "{e}");
    }
}
