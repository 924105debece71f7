//! When to resend a failed S3 request, and how long to wait first.
//!
//! Policy (DESIGN §1): retry on 5xx, 429 (throttled), 408 (request timeout), 409
//! `ConditionalRequestConflict` (a concurrent conditional write was in progress), 400
//! `BadDigest`/`IncompleteBody` (the body arrived damaged or short and was refused), timeouts
//! and connection errors; never on any other 4xx — in particular a 412 (precondition failed) is
//! an answer, not a failure. Waits grow exponentially up to a cap, with "full jitter" (a
//! uniformly random wait in `[0, min(cap, base · 2^attempt)]`) so that many clients failing
//! together do not retry in lockstep.

use super::error::Error;
use std::time::Duration;

/// Times one request is sent before giving up (so `REQUEST_ATTEMPTS_MAX - 1` retries). With
/// the backoff below the waits add up to at most 12.7 s (6.4 s on average), plus the
/// attempts themselves: long enough to ride out an S3 throttling burst or a load balancer
/// restart, short enough that a dead endpoint is reported while someone is still watching.
/// Callers with their own retry loop (the checkpoint thread) retry on top of this.
pub const REQUEST_ATTEMPTS_MAX: u32 = 8;

/// Backoff before the first retry (the ceiling of its random wait).
pub const BACKOFF_BASE_MS: u64 = 100;

/// Ceiling of any single wait. S3 asks clients to back off on `SlowDown`; 10 s is well past
/// the time its partitions take to scale, and keeps one request's worst case bounded.
pub const BACKOFF_CAP_MS: u64 = 10_000;

const _: () = assert!(BACKOFF_BASE_MS > 0 && BACKOFF_BASE_MS <= BACKOFF_CAP_MS);
const _: () = assert!(REQUEST_ATTEMPTS_MAX >= 1 && REQUEST_ATTEMPTS_MAX <= 16);

/// Whether resending the same request may succeed.
pub fn is_retryable(err: &Error) -> bool {
    match err {
        Error::Status { status, code, .. } => match status {
            408 | 429 => true,
            409 => code.as_deref() == Some("ConditionalRequestConflict"),
            // The store refused a body that did not match its Content-MD5 or was shorter
            // than its Content-Length: damaged or cut short on the way, and not stored. The
            // bytes we hold are right, so sending them again may succeed.
            400 => matches!(code.as_deref(), Some("BadDigest" | "IncompleteBody")),
            // A 200 carrying an error body (CompleteMultipartUpload) is retryable when S3
            // says it had an internal problem.
            200 => matches!(code.as_deref(), Some("InternalError" | "SlowDown")),
            500..=599 => true,
            _ => false,
        },
        Error::Transport { retryable, .. } => *retryable,
        Error::Parse { .. } => false,
    }
}

/// Whether a failed attempt may still have been carried out by the server (we sent it but
/// got no clear "no"). A conditional create that then sees 412 must check whether the object
/// it finds is its own.
pub fn may_have_been_applied(err: &Error) -> bool {
    match err {
        Error::Status { status, .. } => *status >= 500,
        Error::Transport { .. } => true,
        Error::Parse { .. } => true,
    }
}

/// The wait before retry number `retry` (1 for the first retry), given a uniformly random
/// `random` (any `u64`). Pure, so the bounds are testable.
pub fn backoff(retry: u32, random: u64) -> Duration {
    let ceiling_ms = backoff_ceiling(retry).as_millis() as u64;
    Duration::from_millis(random % (ceiling_ms + 1))
}

/// The longest wait before retry number `retry`: `min(cap, base · 2^(retry-1))`.
pub fn backoff_ceiling(retry: u32) -> Duration {
    let exp = retry.saturating_sub(1).min(20);
    Duration::from_millis(BACKOFF_BASE_MS.saturating_mul(1 << exp).min(BACKOFF_CAP_MS))
}

/// A random wait before retry number `retry`.
pub fn jittered_backoff(retry: u32) -> Duration {
    backoff(retry, crate::catalog::keys::random_u128() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, code: Option<&str>) -> Error {
        Error::Status {
            status,
            code: code.map(str::to_string),
            message: None,
            request_id: None,
        }
    }

    #[test]
    fn classification() {
        for s in [500, 502, 503, 504, 429, 408] {
            assert!(is_retryable(&status(s, None)), "{s}");
        }
        for s in [400, 401, 403, 404, 405, 409, 411, 412, 416] {
            assert!(!is_retryable(&status(s, None)), "{s}");
        }
        assert!(!is_retryable(&status(412, Some("PreconditionFailed"))));
        assert!(is_retryable(&status(
            409,
            Some("ConditionalRequestConflict")
        )));
        assert!(!is_retryable(&status(409, Some("BucketAlreadyExists"))));
        assert!(is_retryable(&status(400, Some("BadDigest"))));
        assert!(is_retryable(&status(400, Some("IncompleteBody"))));
        assert!(!is_retryable(&status(400, Some("InvalidDigest"))));
        assert!(!is_retryable(&status(400, Some("InvalidArgument"))));
        assert!(is_retryable(&status(503, Some("SlowDown"))));
        assert!(is_retryable(&status(200, Some("InternalError"))));
        assert!(!is_retryable(&status(200, Some("EntityTooSmall"))));
        assert!(is_retryable(&Error::Transport {
            retryable: true,
            message: "reset".into()
        }));
        assert!(!is_retryable(&Error::Transport {
            retryable: false,
            message: "uri".into()
        }));
        assert!(!is_retryable(&Error::Parse {
            what: "x",
            message: "y".into()
        }));
    }

    #[test]
    fn ambiguity() {
        assert!(may_have_been_applied(&status(503, None)));
        assert!(may_have_been_applied(&Error::Transport {
            retryable: true,
            message: "".into()
        }));
        assert!(!may_have_been_applied(&status(
            409,
            Some("ConditionalRequestConflict")
        )));
        assert!(!may_have_been_applied(&status(429, None)));
        assert!(!may_have_been_applied(&status(400, Some("BadDigest"))));
    }

    #[test]
    fn backoff_is_capped_full_jitter() {
        assert_eq!(backoff(1, 0), Duration::ZERO);
        assert_eq!(backoff(1, u64::MAX), Duration::from_millis(u64::MAX % 101));
        assert_eq!(backoff(1, 100), Duration::from_millis(100));
        assert_eq!(backoff(3, 400), Duration::from_millis(400));
        for retry in 1..40 {
            for r in [0, 1, 99, 12_345, 10_000, u64::MAX, u64::MAX - 1] {
                let d = backoff(retry, r);
                assert!(
                    d <= Duration::from_millis(BACKOFF_CAP_MS),
                    "{retry} {r} {d:?}"
                );
            }
        }
        assert_eq!(
            backoff(30, BACKOFF_CAP_MS),
            Duration::from_millis(BACKOFF_CAP_MS)
        );
    }
}
