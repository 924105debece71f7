//! Random access to one immutable S3 object (a layer blob) by ranged GETs.
//!
//! The object's size is learned once, by the HEAD in `S3Store::open_blob`; each
//! [`BlobReader::read_at`] is then one `GET` with `Range: bytes=a-b`. Blobs are immutable,
//! so nothing read can go stale.
//!
//! Block-cache seam: every byte fetched from S3 goes through [`S3Blob::fetch_range`]. A
//! cache (config `--image-cache-size-bytes` / `--image-cache-block-size-bytes`) slots in
//! by making `read_at` split the request into cache blocks keyed by (`full_key`, block
//! index), serve hits from memory, and call `fetch_range` for the misses, block-aligned.

use super::client::{Client, Response};
use super::error::Error;
use super::{request, store_error};
use crate::store::{self, BlobReader};
use std::sync::Arc;

pub struct S3Blob {
    client: Arc<Client>,
    /// Key relative to the store root (what errors carry).
    key: String,
    /// Key inside the bucket.
    full_key: String,
    size: u64,
}

impl S3Blob {
    pub fn new(client: Arc<Client>, key: String, full_key: String, size: u64) -> S3Blob {
        S3Blob {
            client,
            key,
            full_key,
            size,
        }
    }

    /// Fills `buf` from the object's bytes at `offset` with one ranged GET (retried as any
    /// request). The range must lie inside the object and `buf` must not be empty.
    pub fn fetch_range(&self, offset: u64, buf: &mut [u8]) -> store::Result<()> {
        debug_assert!(!buf.is_empty() && offset + buf.len() as u64 <= self.size);
        let len = buf.len() as u64;
        let full = self.full_key.as_str();
        let sign = |b: &_, c: &_| request::get(b, c, full, Some((offset, len)));
        let body = self
            .client
            .call("ranged get", sign, &[], len, |r| {
                check_range(r, offset, len, self.size)
            })
            .map_err(|f| store_error(&self.client, &self.key, full, f))?;
        buf.copy_from_slice(&body);
        Ok(())
    }
}

/// Accepts a ranged GET's answer only if it carries exactly the bytes asked for: a 206 of the
/// right length, or a 200 with the whole object when the whole object was asked for (a store
/// may ignore `Range` then).
fn check_range(r: Response, offset: u64, len: u64, size: u64) -> Result<Vec<u8>, Error> {
    let whole = offset == 0 && len == size;
    match r.status {
        206 if r.body.len() as u64 == len => Ok(r.body),
        200 if whole && r.body.len() as u64 == len => Ok(r.body),
        200 | 206 => Err(Error::Parse {
            what: "ranged GET",
            message: format!(
                "asked for {len} bytes at {offset}, got HTTP {} with {} bytes (Content-Range {:?})",
                r.status,
                r.body.len(),
                r.content_range
            ),
        }),
        _ => Err(super::xml::status_error(r.status, &r.body)),
    }
}

impl BlobReader for S3Blob {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> store::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(store::Error::Remote {
                key: self.key.clone(),
                message: format!(
                    "read of {} bytes at {offset} is past the end of the {}-byte object",
                    buf.len(),
                    self.size
                ),
            });
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.fetch_range(offset, buf)
    }

    fn size_bytes(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, n: usize) -> Response {
        Response {
            status,
            body: vec![7; n],
            ..Response::default()
        }
    }

    #[test]
    fn range_answers() {
        assert_eq!(check_range(resp(206, 4), 10, 4, 100).unwrap().len(), 4);
        assert!(check_range(resp(206, 3), 10, 4, 100).is_err());
        // A store that ignores Range is fine only when we wanted everything.
        assert!(check_range(resp(200, 100), 0, 100, 100).is_ok());
        assert!(check_range(resp(200, 4), 10, 4, 100).is_err());
        let e = check_range(resp(416, 0), 10, 4, 100).unwrap_err();
        assert_eq!(e.status(), Some(416));
    }
}
