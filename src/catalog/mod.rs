//! The catalog: everything about the image store's objects that more than one program must
//! agree on — keys and ids ([`keys`]), the manifest and gc-mark formats with their invariants
//! ([`manifest`], [`gcmark`]), and the one way a manifest is published ([`publish`]). The
//! engine, `mvps-s3-gc` and `mvpsctl` all use it (docs/FORMAT.md).

pub mod gcmark;
pub mod keys;
pub mod manifest;
pub mod publish;

pub use publish::{publish_next, Conflict, Edit, Outcome};

use std::time::Duration;

/// The garbage collector never deletes a blob younger than this (its age taken from the
/// ULID in its id and from the store's modification time, whichever is younger), whatever
/// its thresholds say; and a writer never publishes a manifest naming a blob whose upload
/// began more than half of it ago (docs/FORMAT.md, *Garbage collection*).
pub const MIN_BLOB_AGE: Duration = Duration::from_secs(15 * 60);

/// Test-only: overrides [`MIN_BLOB_AGE`] (whole seconds) for both sides of the bound at once,
/// so that tests need seconds rather than minutes. Never set it in production: a collector
/// and a writer that disagree on it can lose data.
pub const MIN_BLOB_AGE_ENV: &str = "MVPS_MIN_BLOB_AGE_SECS";

/// [`MIN_BLOB_AGE`], or the test override from [`MIN_BLOB_AGE_ENV`].
pub fn min_blob_age() -> Duration {
    min_blob_age_from(std::env::var(MIN_BLOB_AGE_ENV).ok().as_deref())
}

fn min_blob_age_from(v: Option<&str>) -> Duration {
    match v.map(str::trim).filter(|v| !v.is_empty()) {
        None => MIN_BLOB_AGE,
        Some(v) => match v.parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                log::warn!("{MIN_BLOB_AGE_ENV}={v:?} is not a number of seconds; ignored");
                MIN_BLOB_AGE
            }
        },
    }
}

/// How long after its upload began a new blob may still be named by a manifest being
/// published: half the minimum blob age (the other half is the margin for clock skew
/// between writer, collector and store).
pub fn publish_bound() -> Duration {
    min_blob_age() / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_blob_age_override() {
        assert_eq!(min_blob_age_from(None), MIN_BLOB_AGE);
        assert_eq!(min_blob_age_from(Some("4")), Duration::from_secs(4));
        assert_eq!(min_blob_age_from(Some("x")), MIN_BLOB_AGE);
        assert_eq!(min_blob_age_from(Some(" ")), MIN_BLOB_AGE);
    }
}
