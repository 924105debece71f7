//! Random access to one immutable S3 object (a layer blob) by ranged GETs.
//!
//! Without a cache, the object's size is learned by a HEAD in `S3Store::open_blob` and each
//! [`BlobReader::read_at`] is one `GET` with `Range: bytes=a-b`. With the block cache
//! ([`crate::store::cache`], `--image-cache-size-bytes`), `open_blob` instead asks for the
//! object's first cache block ([`S3Blob::open_first_block`]): the answer's `Content-Range`
//! carries the size, and the block (the layer header and, usually, its whole index) goes
//! into the cache, so opening a layer is one request. Blobs are immutable, so nothing read
//! can go stale.

use super::client::{Client, Response};
use super::error::Error;
use super::{request, store_error};
use crate::store::cache::Source;
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

    /// Sends `GET` with `Range: bytes=0-(block_bytes-1)`: returns the object's size (from
    /// `Content-Range`) and its first `min(size, block_bytes)` bytes. An empty object answers
    /// 416 and gives `(0, [])`. `None` if the answer does not say the size (the caller then
    /// falls back to HEAD).
    pub fn open_first_block(
        client: &Client,
        key: &str,
        full_key: &str,
        block_bytes: u64,
    ) -> store::Result<Option<(u64, Vec<u8>)>> {
        let sign = |b: &_, c: &_| request::get(b, c, full_key, Some((0, block_bytes)));
        client
            .call("ranged get", sign, &[], block_bytes, |r| {
                first_block_answer(r, block_bytes)
            })
            .map_err(|f| store_error(client, key, full_key, f))
    }

    /// Fills `buf` from the object's bytes at `offset` with one ranged GET (retried as any
    /// request). The range must lie inside the object and `buf` must not be empty.
    pub fn fetch_range(&self, offset: u64, buf: &mut [u8]) -> store::Result<()> {
        let body = self.fetch_vec(offset, buf.len() as u64)?;
        buf.copy_from_slice(&body);
        Ok(())
    }

    /// [`S3Blob::fetch_range`] into a new buffer: the response body itself, not a copy.
    pub fn fetch_vec(&self, offset: u64, len: u64) -> store::Result<Vec<u8>> {
        debug_assert!(len > 0 && offset + len <= self.size);
        let full = self.full_key.as_str();
        let sign = |b: &_, c: &_| request::get(b, c, full, Some((offset, len)));
        self.client
            .call("ranged get", sign, &[], len, |r| {
                check_range(&r, offset, len, self.size).map(|()| r.body)
            })
            .map_err(|f| store_error(&self.client, &self.key, full, f))
    }
}

/// The block cache fetches through here: the body is read straight into its (recycled)
/// buffers, which it keeps.
impl Source for S3Blob {
    fn fetch(&self, offset: u64, parts: Vec<Vec<u8>>) -> store::Result<Vec<Vec<u8>>> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        debug_assert!(len > 0 && offset + len <= self.size);
        let full = self.full_key.as_str();
        let sign = |b: &_, c: &_| request::get(b, c, full, Some((offset, len)));
        self.client
            .call_into("ranged get", sign, parts, |r| {
                check_range(&r, offset, len, self.size)?;
                if r.parts.is_empty() {
                    return Err(Error::Parse {
                        what: "ranged GET",
                        message: format!("the {len} bytes at {offset} did not reach the buffers"),
                    });
                }
                Ok(r.parts)
            })
            .map_err(|f| store_error(&self.client, &self.key, full, f))
    }

    fn read_into(&self, offset: u64, buf: &mut [u8]) -> store::Result<()> {
        self.read_at(offset, buf)
    }

    fn size_bytes(&self) -> u64 {
        self.size
    }
}

/// Accepts a ranged GET's answer only if it carries exactly the bytes asked for (in `body`
/// or `parts`): a 206 of the right length, or a 200 with the whole object when the whole
/// object was asked for (a store may ignore `Range` then).
fn check_range(r: &Response, offset: u64, len: u64, size: u64) -> Result<(), Error> {
    let whole = offset == 0 && len == size;
    let got = r.body.len() as u64 + r.parts.iter().map(|p| p.len() as u64).sum::<u64>();
    match r.status {
        206 if got == len => Ok(()),
        200 if whole && got == len => Ok(()),
        200 | 206 => Err(Error::Parse {
            what: "ranged GET",
            message: format!(
                "asked for {len} bytes at {offset}, got HTTP {} with {got} bytes (Content-Range {:?})",
                r.status, r.content_range
            ),
        }),
        _ => Err(super::xml::status_error(r.status, &r.body)),
    }
}

/// The answer to [`S3Blob::open_first_block`]'s GET.
fn first_block_answer(r: Response, block_bytes: u64) -> Result<Option<(u64, Vec<u8>)>, Error> {
    let n = r.body.len() as u64;
    match r.status {
        // The whole object, when it fits in the range (or the store ignored Range).
        200 if n <= block_bytes => Ok(Some((n, r.body))),
        206 => match r.content_range.as_deref().and_then(content_range_total) {
            Some(size) if n == size.min(block_bytes) => Ok(Some((size, r.body))),
            Some(_) => Err(Error::Parse {
                what: "ranged GET",
                message: format!(
                    "asked for the first {block_bytes} bytes, got {n} (Content-Range {:?})",
                    r.content_range
                ),
            }),
            None => Ok(None),
        },
        // Range not satisfiable: only an empty object has no byte 0.
        416 => Ok(Some((0, Vec::new()))),
        _ => Err(super::xml::status_error(r.status, &r.body)),
    }
}

/// The total size in `Content-Range: bytes 0-99/1234` (`None` for `*/…` forms or `/*`).
fn content_range_total(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (_, total) = rest.split_once('/')?;
    total.trim().parse().ok()
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
        assert!(check_range(&resp(206, 4), 10, 4, 100).is_ok());
        assert!(check_range(&resp(206, 3), 10, 4, 100).is_err());
        // Read into buffers: they count as the body.
        let parts = Response {
            parts: vec![vec![1; 3], vec![2; 1]],
            ..resp(206, 0)
        };
        assert!(check_range(&parts, 10, 4, 100).is_ok());
        assert!(check_range(&parts, 10, 5, 100).is_err());
        // A store that ignores Range is fine only when we wanted everything.
        assert!(check_range(&resp(200, 100), 0, 100, 100).is_ok());
        assert!(check_range(&resp(200, 4), 10, 4, 100).is_err());
        let e = check_range(&resp(416, 0), 10, 4, 100).unwrap_err();
        assert_eq!(e.status(), Some(416));
    }

    #[test]
    fn first_block_answers() {
        let ranged = |n: usize, cr: &str| Response {
            content_range: Some(cr.to_string()),
            ..resp(206, n)
        };
        let size = |r| first_block_answer(r, 16).map(|o| o.map(|(s, b)| (s, b.len())));
        assert_eq!(
            size(ranged(16, "bytes 0-15/1000")).unwrap(),
            Some((1000, 16))
        );
        assert_eq!(size(ranged(10, "bytes 0-9/10")).unwrap(), Some((10, 10)));
        assert!(size(ranged(15, "bytes 0-14/1000")).is_err());
        assert_eq!(size(ranged(16, "bytes 0-15/*")).unwrap(), None);
        assert_eq!(size(resp(200, 12)).unwrap(), Some((12, 12)));
        assert!(size(resp(200, 17)).is_err());
        assert_eq!(size(resp(416, 0)).unwrap(), Some((0, 0)));
        assert_eq!(size(resp(403, 0)).unwrap_err().status(), Some(403));
        assert_eq!(content_range_total(" bytes 0-0/7 "), Some(7));
        assert_eq!(content_range_total("bytes */7"), Some(7));
        assert_eq!(content_range_total("items 0-1/7"), None);
    }
}
