//! Uploading a local file: one PUT below [`MULTIPART_THRESHOLD_BYTES`], a multipart upload
//! above it (create, parts in parallel on a few threads, complete; abort on failure so the
//! parts are not left behind, billed, in the bucket).

use super::client::Response;
use super::error::Error;
use super::{expect_success, request, xml, S3Store, SMALL_BODY_BYTES_MAX};
use crate::store::{self, ImageStore};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Files at least this large go up as multipart uploads. Below it, one PUT is cheaper (one
/// request instead of three or more) and its retry resends at most 16 MiB.
pub const MULTIPART_THRESHOLD_BYTES: u64 = 16 << 20;

/// Size of each part (the last may be smaller). Also the memory one upload thread holds.
pub const MULTIPART_PART_BYTES: u64 = 16 << 20;

/// Parts uploaded at once: 4 × 16 MiB in flight saturates a gigabit link and costs 64 MiB.
pub const MULTIPART_UPLOAD_THREADS: usize = 4;

/// S3 limits: parts 1..=10000; each part but the last at least 5 MiB, at most 5 GiB.
pub const MULTIPART_PARTS_MAX: u64 = 10_000;
pub const MULTIPART_PART_BYTES_MIN: u64 = 5 << 20;
pub const MULTIPART_PART_BYTES_MAX: u64 = 5 << 30;

/// An upload's ETag-bearing answers are small XML or nothing.
const PART_RESPONSE_BYTES_MAX: u64 = SMALL_BODY_BYTES_MAX;

const _: () = assert!(MULTIPART_PART_BYTES >= MULTIPART_PART_BYTES_MIN);
const _: () = assert!(MULTIPART_THRESHOLD_BYTES >= MULTIPART_PART_BYTES_MIN);
const _: () = assert!(MULTIPART_UPLOAD_THREADS >= 1);

/// The part size for an object: [`MULTIPART_PART_BYTES`], or larger (whole MiB) when that
/// would need more than [`MULTIPART_PARTS_MAX`] parts. `None` if the object is too large.
pub fn part_size_bytes(object_bytes: u64) -> Option<u64> {
    const MIB: u64 = 1 << 20;
    let needed = object_bytes.div_ceil(MULTIPART_PARTS_MAX).div_ceil(MIB) * MIB;
    let part = needed.max(MULTIPART_PART_BYTES);
    (part <= MULTIPART_PART_BYTES_MAX).then_some(part)
}

pub fn put_file(s: &S3Store, key: &str, full_key: &str, path: &Path) -> store::Result<()> {
    let io = |op: &'static str| {
        move |source| store::Error::Io {
            key: key.to_string(),
            op,
            source,
        }
    };
    let file = File::open(path).map_err(io("open file to upload"))?;
    let size = file.metadata().map_err(io("stat file to upload"))?.len();
    if size < MULTIPART_THRESHOLD_BYTES {
        let mut data = vec![0u8; size as usize];
        file.read_exact_at(&mut data, 0)
            .map_err(io("read file to upload"))?;
        return s.put(key, &data);
    }
    let Some(part_bytes) = part_size_bytes(size) else {
        return Err(store::Error::Remote {
            key: key.to_string(),
            message: format!("{size}-byte file is larger than one S3 object may be"),
        });
    };
    let started = std::time::Instant::now();
    let upload_id = create(s, key, full_key)?;
    let result = upload_parts(s, key, full_key, &upload_id, &file, size, part_bytes)
        .and_then(|etags| complete(s, key, full_key, &upload_id, &etags, size));
    if result.is_err() {
        abort(s, full_key, &upload_id);
    } else {
        let secs = started.elapsed().as_secs_f64();
        log::info!(
            "s3 multipart upload {full_key}: {size} bytes in {} parts, {:.3} s ({:.1} MiB/s)",
            size.div_ceil(part_bytes),
            secs,
            size as f64 / secs.max(1e-9) / f64::from(1 << 20)
        );
    }
    result
}

fn create(s: &S3Store, key: &str, full_key: &str) -> store::Result<String> {
    let sign = |b: &_, c: &_| request::create_multipart(b, c, full_key);
    s.client
        .call(
            "create multipart upload",
            sign,
            &[],
            SMALL_BODY_BYTES_MAX,
            |r| {
                expect_success(r)
                    .and_then(|r| xml::parse_create_multipart(&String::from_utf8_lossy(&r.body)))
            },
        )
        .map_err(|f| s.error(key, full_key, f))
}

/// Uploads every part on up to [`MULTIPART_UPLOAD_THREADS`] threads, which take part
/// numbers from a shared counter. The first failure stops the others from starting parts.
/// Returns the ETags in part order.
fn upload_parts(
    s: &S3Store,
    key: &str,
    full_key: &str,
    upload_id: &str,
    file: &File,
    size: u64,
    part_bytes: u64,
) -> store::Result<Vec<String>> {
    let parts = size.div_ceil(part_bytes) as usize;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<store::Error>> = Mutex::new(None);
    let etags: Mutex<Vec<Option<String>>> = Mutex::new(vec![None; parts]);
    std::thread::scope(|scope| {
        for _ in 0..MULTIPART_UPLOAD_THREADS.min(parts) {
            scope.spawn(|| {
                let mut buf = Vec::new();
                while !failed.load(Ordering::Relaxed) {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= parts {
                        return;
                    }
                    let offset = index as u64 * part_bytes;
                    let len = part_bytes.min(size - offset) as usize;
                    buf.resize(len, 0);
                    let r = file
                        .read_exact_at(&mut buf, offset)
                        .map_err(|source| store::Error::Io {
                            key: key.into(),
                            op: "read part",
                            source,
                        })
                        .and_then(|()| upload_part(s, key, full_key, upload_id, index, &buf));
                    match r {
                        Ok(etag) => etags.lock().unwrap()[index] = Some(etag),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    let etags = etags.into_inner().unwrap();
    Ok(etags
        .into_iter()
        .map(|e| e.expect("every part uploaded when none failed"))
        .collect())
}

fn upload_part(
    s: &S3Store,
    key: &str,
    full_key: &str,
    upload_id: &str,
    index: usize,
    data: &[u8],
) -> store::Result<String> {
    let part = u16::try_from(index + 1).expect("part numbers are at most 10000");
    let md5 = super::md5::content_md5(data);
    let sign = |b: &_, c: &_| request::upload_part(b, c, full_key, part, upload_id, &md5);
    s.client
        .call(
            "upload part",
            sign,
            data,
            PART_RESPONSE_BYTES_MAX,
            |r: Response| {
                let r = expect_success(r)?;
                r.etag.ok_or_else(|| Error::Parse {
                    what: "UploadPart",
                    message: format!("no ETag for part {part}"),
                })
            },
        )
        .map_err(|f| s.error(key, full_key, f))
}

fn complete(
    s: &S3Store,
    key: &str,
    full_key: &str,
    upload_id: &str,
    etags: &[String],
    size: u64,
) -> store::Result<()> {
    let (_, body) = request::complete_multipart(
        s.client.bucket(),
        s.client.credentials(),
        full_key,
        upload_id,
        etags,
    );
    let sign = |b: &_, c: &_| request::complete_multipart(b, c, full_key, upload_id, etags).0;
    let result = s.client.call(
        "complete multipart upload",
        sign,
        &body,
        SMALL_BODY_BYTES_MAX,
        |r| {
            expect_success(r)
                .and_then(|r| xml::parse_complete_multipart(&String::from_utf8_lossy(&r.body)))
        },
    );
    match result {
        Ok(()) => Ok(()),
        // An earlier attempt completed the upload but its answer was lost: the upload id is
        // gone now. The object is ours if it has our size (nobody else writes this blob key).
        Err(f) if f.maybe_applied && f.last.code() == Some("NoSuchUpload") => {
            match s.head_size(key, full_key) {
                Ok(n) if n == size => Ok(()),
                _ => Err(s.error(key, full_key, f)),
            }
        }
        Err(f) => Err(s.error(key, full_key, f)),
    }
}

/// Best effort: a failed abort leaves parts that a bucket lifecycle rule
/// (AbortIncompleteMultipartUpload) cleans up; the upload's own error is what matters.
fn abort(s: &S3Store, full_key: &str, upload_id: &str) {
    let sign = |b: &_, c: &_| request::abort_multipart(b, c, full_key, upload_id);
    let r = s.client.call(
        "abort multipart upload",
        sign,
        &[],
        SMALL_BODY_BYTES_MAX,
        |r| match r.status {
            404 => Ok(()),
            _ => expect_success(r).map(drop),
        },
    );
    if let Err(f) = r {
        log::warn!(
            "s3 abort multipart upload of {full_key} (upload id {upload_id}): {}",
            f.last
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes() {
        assert_eq!(part_size_bytes(40 << 20), Some(MULTIPART_PART_BYTES));
        assert_eq!(
            part_size_bytes(MULTIPART_PART_BYTES * MULTIPART_PARTS_MAX),
            Some(16 << 20)
        );
        let big = MULTIPART_PART_BYTES * MULTIPART_PARTS_MAX + 1;
        assert_eq!(part_size_bytes(big), Some(17 << 20));
        let p = part_size_bytes(1 << 40).unwrap();
        assert!((1u64 << 40).div_ceil(p) <= MULTIPART_PARTS_MAX);
        assert_eq!(
            part_size_bytes(MULTIPART_PART_BYTES_MAX * MULTIPART_PARTS_MAX + 1),
            None
        );
    }
}
