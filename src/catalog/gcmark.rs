//! Garbage-collector marks (docs/FORMAT.md, *Garbage collection*): `gcmark/<blob_id>`, one
//! small JSON object per blob that a pass of `mvps-s3-gc` found unreferenced, and
//! `gcmark/pass.json`, what the last pass saw. Only the collector writes them; checked
//! ([`Mark::check`], [`PassRecord::check`]) before every write and after every read.

use super::keys;
use serde::{Deserialize, Serialize};

pub const GCMARK_FORMAT_VERSION: u32 = 1;

/// A blob seen unreferenced by `seen_count` passes, the first at `first_seen_unused_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub format_version: u32,
    pub blob_id: String,
    /// Passes that found the blob unreferenced (this mark's writer included), ≥ 1.
    pub seen_count: u32,
    /// Unix seconds (collector's clock) of the first pass that found it unreferenced.
    pub first_seen_unused_at: u64,
}

/// What one pass saw, for the next pass's sanity check ("a listing of manifests much
/// smaller than the previous pass saw").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassRecord {
    pub format_version: u32,
    /// Unix seconds when the pass started.
    pub started_at: u64,
    /// Manifests the pass kept: no later pass may list fewer unless something else deleted
    /// manifests.
    pub manifests_kept: u64,
}

fn invalid(key: &str, why: String) -> String {
    format!("gc mark {key}: {why}")
}

impl Mark {
    pub fn key(&self) -> String {
        keys::gcmark_key(&self.blob_id)
    }

    /// The invariants: known version, a valid blob id that matches the key, seen at least once.
    pub fn check(&self, key: &str) -> Result<(), String> {
        if self.format_version != GCMARK_FORMAT_VERSION {
            return Err(invalid(
                key,
                format!("format version {} is not supported", self.format_version),
            ));
        }
        if keys::parse_gcmark_key(key) != Some(self.blob_id.as_str()) {
            return Err(invalid(
                key,
                format!("blob id {:?} does not match the key", self.blob_id),
            ));
        }
        if self.seen_count == 0 {
            return Err(invalid(key, "seen_count is 0".into()));
        }
        Ok(())
    }

    /// The stored form; callers [`Mark::check`] it first (the collector does, before every
    /// write).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("marks serialize")
    }

    pub fn parse(key: &str, bytes: &[u8]) -> Result<Mark, String> {
        let m: Mark =
            serde_json::from_slice(bytes).map_err(|e| invalid(key, format!("not a mark: {e}")))?;
        m.check(key)?;
        Ok(m)
    }
}

impl PassRecord {
    pub fn check(&self) -> Result<(), String> {
        if self.format_version != GCMARK_FORMAT_VERSION {
            return Err(invalid(
                keys::GC_PASS_KEY,
                format!("format version {} is not supported", self.format_version),
            ));
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("pass records serialize")
    }

    pub fn parse(bytes: &[u8]) -> Result<PassRecord, String> {
        let r: PassRecord = serde_json::from_slice(bytes)
            .map_err(|e| invalid(keys::GC_PASS_KEY, format!("not a pass record: {e}")))?;
        r.check()?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_are_checked() {
        let id = keys::new_blob_id();
        let m = Mark {
            format_version: GCMARK_FORMAT_VERSION,
            blob_id: id.clone(),
            seen_count: 2,
            first_seen_unused_at: 1_790_000_000,
        };
        assert_eq!(Mark::parse(&m.key(), &m.to_bytes()), Ok(m.clone()));
        let other = keys::gcmark_key(&keys::new_blob_id());
        assert!(Mark::parse(&other, &m.to_bytes()).is_err(), "key mismatch");
        let zero = Mark {
            seen_count: 0,
            ..m.clone()
        };
        let bytes = serde_json::to_vec(&zero).unwrap();
        assert!(Mark::parse(&m.key(), &bytes)
            .unwrap_err()
            .contains("seen_count"));
        assert!(Mark::parse(&m.key(), b"{").is_err());
        let r = PassRecord {
            format_version: 1,
            started_at: 5,
            manifests_kept: 9,
        };
        assert_eq!(PassRecord::parse(&r.to_bytes()), Ok(r));
        assert!(
            PassRecord::parse(b"{\"format_version\":2,\"started_at\":1,\"manifests_kept\":1}")
                .is_err()
        );
    }
}
