//! The `Content-MD5` header of request bodies (RFC 1864: the base64 of the body's MD5).
//!
//! S3 (and SeaweedFS, MinIO, R2, Ceph) check a request body against `Content-MD5` before
//! storing anything and answer `400 BadDigest` on a mismatch. That is what keeps a PUT whose
//! connection was cut short from being stored as a shorter object (docs/S3.md, *Request
//! integrity*). MD5 is a checksum here, not a security measure: the request signature covers
//! the header. The digest comes from the `md-5` crate, which rusty-s3 already builds on for
//! its own DeleteObjects bodies; the encoding from `base64`, which rusty-s3 uses too.

use base64::Engine;
use md5::{Digest, Md5};

/// The value of a `Content-MD5` header for `body`.
pub fn content_md5(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // S3's documented value for an empty body; RFC 1321's test suite, in base64.
        assert_eq!(content_md5(b""), "1B2M2Y8AsgTpgAmY7PhCfg==");
        assert_eq!(content_md5(b"abc"), "kAFQmDzST7DWlj99KOF/cg==");
        assert_eq!(content_md5(b"message digest"), "+WtpfXy3k41SWi8xqvFh0A==");
    }

    /// Cross-check with the `Content-MD5` rusty-s3 computes for a DeleteObjects body.
    #[test]
    fn matches_rusty_s3() {
        let (b, _) = super::super::request::bucket(Some("http://h:1"), "us-east-1", "bkt").unwrap();
        let c = rusty_s3::Credentials::new("AKIAIOSFODNN7EXAMPLE", "secret");
        for n in [1, 7, 100, 1000] {
            let keys: Vec<String> = (0..n).map(|i| format!("t/key-{i}")).collect();
            let (r, body) = super::super::request::delete_objects(&b, &c, &keys);
            let theirs = &r
                .headers
                .iter()
                .find(|(h, _)| *h == "Content-MD5")
                .unwrap()
                .1;
            assert_eq!(&content_md5(&body), theirs, "{n} keys");
        }
    }
}
