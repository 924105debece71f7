//! Errors of the S3 client, and their translation into the store layer's coarse
//! [`crate::store::Error`] (NotFound / Remote / Unavailable / BadKey).
//!
//! `s3::Error` keeps what S3 said (HTTP status, error code, message, request id) or why the
//! request never got an answer. Whether it is worth retrying is decided in [`super::retry`];
//! what an operator should do about it is decided here, in [`to_store_error`].

use crate::store;
use std::fmt;

/// One failed S3 request (one attempt), before any retry decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The server answered with a status we did not expect for this request.
    Status {
        status: u16,
        /// `<Code>` of the error XML (`NoSuchKey`, `AccessDenied`, …), if the body had one.
        code: Option<String>,
        /// `<Message>` of the error XML, if any.
        message: Option<String>,
        /// `<RequestId>`, which the store's operator needs to look the request up.
        request_id: Option<String>,
    },
    /// No usable answer: connection refused or reset, DNS failure, timeout, broken body.
    Transport {
        /// True when resending may help (timeouts, refused or reset connections).
        retryable: bool,
        message: String,
    },
    /// A success status with a body we could not make sense of.
    Parse { what: &'static str, message: String },
}

impl Error {
    /// The S3 error code, if the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Status { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status, if the server answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Status {
                status,
                code,
                message,
                request_id,
            } => {
                write!(f, "HTTP {status}")?;
                if let Some(c) = code {
                    write!(f, " {c}")?;
                }
                if let Some(m) = message {
                    write!(f, ": {m}")?;
                }
                if let Some(r) = request_id {
                    write!(f, " (request id {r})")?;
                }
                Ok(())
            }
            Error::Transport { message, .. } => write!(f, "{message}"),
            Error::Parse { what, message } => write!(f, "unreadable {what} response: {message}"),
        }
    }
}

impl std::error::Error for Error {}

/// Where a failed request was aimed, for messages a person can act on.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The endpoint the client talks to (`https://s3.us-east-1.amazonaws.com`, …).
    pub endpoint: &'a str,
    pub bucket: &'a str,
    /// Key relative to the store root: what the caller asked for, carried in `store::Error`.
    pub key: &'a str,
    /// Key inside the bucket (store prefix + `key`).
    pub full_key: &'a str,
}

/// Turns the last error of a request into the store layer's error.
///
/// `attempts` is how many times the request was sent; `exhausted` is true when the error was
/// retryable and we ran out of attempts, which makes it `Unavailable` whatever it was.
pub fn to_store_error(err: &Error, t: Target<'_>, attempts: u32, exhausted: bool) -> store::Error {
    let key = t.key.to_string();
    let object = format!("s3://{}/{}", t.bucket, t.full_key);
    if exhausted {
        let message = format!(
            "{object} at {}: gave up after {attempts} attempts; last error: {err}",
            t.endpoint
        );
        return store::Error::Unavailable { key, message };
    }
    if is_not_found(err) {
        return store::Error::NotFound { key };
    }
    store::Error::Remote {
        key,
        message: format!("{object}: {}", explain(err, t)),
    }
}

/// A missing object, as opposed to a missing bucket (both are HTTP 404). A HEAD answer has
/// no body and so no code: a bare 404 is taken as a missing object.
fn is_not_found(err: &Error) -> bool {
    matches!(err, Error::Status { status: 404, code, .. }
        if code.as_deref().is_none_or(|c| c == "NoSuchKey"))
}

/// What went wrong and what to do about it, for the errors an operator can fix.
fn explain(err: &Error, t: Target<'_>) -> String {
    let (bucket, endpoint) = (t.bucket, t.endpoint);
    let advice = match (err.status(), err.code()) {
        (_, Some("NoSuchBucket")) => format!(
            "bucket {bucket:?} does not exist at {endpoint}: create it, or fix \
             --image-store-s3-bucket / S3_ENDPOINT / AWS_REGION"
        ),
        (_, Some("InvalidAccessKeyId")) => format!(
            "the access key in AWS_ACCESS_KEY_ID is not known to {endpoint}: \
             check AWS_ACCESS_KEY_ID (and S3_ENDPOINT)"
        ),
        (_, Some("SignatureDoesNotMatch")) => format!(
            "the request signature was refused by {endpoint}: AWS_SECRET_ACCESS_KEY is wrong \
             for AWS_ACCESS_KEY_ID, or AWS_REGION does not match the bucket's region"
        ),
        (_, Some("AccessDenied")) => format!(
            "access denied: the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY \
             may not read and write bucket {bucket:?} (check them and the bucket policy)"
        ),
        // HEAD answers have no body, so no code: any of the three causes above.
        (Some(403), None) => format!(
            "refused (HTTP 403 without detail): check AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY, and that they may read and write bucket {bucket:?}"
        ),
        (_, Some("PermanentRedirect" | "AuthorizationHeaderMalformed")) | (Some(301), _) => {
            format!("bucket {bucket:?} is in another region than AWS_REGION: set AWS_REGION")
        }
        (_, Some("NotImplemented")) | (Some(501), _) => {
            format!("{endpoint} does not implement this request")
        }
        _ => String::new(),
    };
    if advice.is_empty() {
        err.to_string()
    } else {
        format!("{advice} ({err})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, code: Option<&str>) -> Error {
        Error::Status {
            status,
            code: code.map(str::to_string),
            message: Some("m".into()),
            request_id: Some("R1".into()),
        }
    }

    const T: Target<'static> = Target {
        endpoint: "http://127.0.0.1:1",
        bucket: "bkt",
        key: "blobs/a.mvps-blob",
        full_key: "test/blobs/a.mvps-blob",
    };

    #[test]
    fn not_found_only_for_missing_objects() {
        let e = to_store_error(&status(404, Some("NoSuchKey")), T, 1, false);
        assert!(matches!(e, store::Error::NotFound { ref key } if key == "blobs/a.mvps-blob"));
        assert!(matches!(
            to_store_error(&status(404, None), T, 1, false),
            store::Error::NotFound { .. }
        ));
        let e = to_store_error(&status(404, Some("NoSuchBucket")), T, 1, false);
        let store::Error::Remote { message, .. } = e else {
            panic!("{e}")
        };
        assert!(
            message.contains("bucket \"bkt\" does not exist"),
            "{message}"
        );
        assert!(
            message.contains("s3://bkt/test/blobs/a.mvps-blob"),
            "{message}"
        );
    }

    #[test]
    fn credential_errors_name_the_variable() {
        for (code, var) in [
            ("InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"),
            ("SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY"),
            ("AccessDenied", "AWS_ACCESS_KEY_ID"),
        ] {
            let e = to_store_error(&status(403, Some(code)), T, 1, false);
            let store::Error::Remote { message, .. } = e else {
                panic!("{e}")
            };
            assert!(message.contains(var), "{code}: {message}");
            assert!(message.contains("request id R1"), "{code}: {message}");
        }
    }

    #[test]
    fn exhausted_retries_are_unavailable() {
        let e = to_store_error(&status(503, Some("SlowDown")), T, 8, true);
        let store::Error::Unavailable { message, .. } = e else {
            panic!("{e}")
        };
        assert!(
            message.contains("8 attempts") && message.contains("SlowDown"),
            "{message}"
        );
    }
}
