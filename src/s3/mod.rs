//! The S3 image store: [`crate::store::ImageStore`] over any S3-compatible object store (AWS
//! S3, R2, MinIO, SeaweedFS, Ceph RGW). Design note: `docs/S3.md`.
//!
//! Layers, sans-IO at the core (STYLE.md rule 2):
//! - [`request`]: key checks, URL style, one signed request per operation (rusty-s3). Pure.
//! - [`xml`]: response parsers (errors, listings, multipart, batch delete). Pure.
//! - [`retry`]: which failures to retry and the backoff. Pure.
//! - `md5`: the `Content-MD5` every request body carries, so that the store refuses a body
//!   cut short instead of storing it (docs/S3.md, *Request integrity*). Pure.
//! - [`error`]: `s3::Error` and its translation into `store::Error` with advice.
//! - `client`: the only code that calls ureq; sends with retries.
//! - `blob`, `multipart`: ranged reads of blobs, and large uploads.
//! - `testing` (tests and the `testing` feature only): starts a real SeaweedFS for tests
//!   (this crate's and the conformance suite's).
//!
//! Keys given to the store are relative to its root; the store prepends its prefix. The
//! fencing primitive, [`ImageStore::create_if_absent`], is a PUT with `If-None-Match: *`:
//! 200 → created, 412 → already exists. [`S3Store::check_bucket`] proves at startup that
//! the store honours it.

mod blob;
mod client;
pub mod error;
mod md5;
mod multipart;
pub mod request;
pub mod retry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod xml;

pub use error::Error;
pub use multipart::{MULTIPART_PART_BYTES, MULTIPART_THRESHOLD_BYTES, MULTIPART_UPLOAD_THREADS};

use crate::store::cache::{BlockCache, CacheStats};
use crate::store::{self, BlobReader, CreateOutcome, ImageStore, ObjectInfo, UploadInfo};
use client::{Client, Failure, Response};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Largest object [`ImageStore::get`] reads into memory. `get` is for manifests (kilobytes)
/// and occasionally a whole layer blob; this only stops a runaway allocation.
pub const OBJECT_GET_BYTES_MAX: u64 = 4 << 30;

/// Largest ListObjectsV2 response body we read: a 1000-key page is ~300 KiB.
pub const LIST_BODY_BYTES_MAX: u64 = 16 << 20;

/// Pages one `list` call may fetch (100 million keys at 1000 a page). Bounds the loop
/// should a store keep handing out continuation tokens.
pub const LIST_PAGES_MAX: u32 = 100_000;

/// Body bytes expected from requests that answer with a small XML document or nothing.
const SMALL_BODY_BYTES_MAX: u64 = 1 << 20;

/// Where the startup probe writes (under the store prefix), followed by a random name.
pub const PROBE_KEY_PREFIX: &str = "probe/";

/// Connection settings of an S3 image store.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket (`test/`); a missing trailing `/` is added.
    pub prefix: String,
    /// `AWS_REGION`, default `us-east-1`: part of every signature.
    pub region: String,
    /// `S3_ENDPOINT`: set → path-style requests to it; unset → AWS, virtual-hosted style.
    pub endpoint: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
    /// Keys per ListObjectsV2 page, 1..=1000 (tests lower it to exercise pagination).
    pub list_page_keys: u16,
}

impl fmt::Debug for S3Config {
    /// Never prints the secret or the session token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field("list_page_keys", &self.list_page_keys)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// Bucket and prefix from the caller (`--image-store-s3-bucket`/`-prefix`), the rest
    /// from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`
    /// and `S3_ENDPOINT`.
    pub fn from_env(bucket: &str, prefix: &str) -> Result<S3Config, String> {
        S3Config::from_lookup(bucket, prefix, |k| std::env::var(k).ok())
    }

    /// [`S3Config::from_env`] with the environment passed in (for tests).
    pub fn from_lookup(
        bucket: &str,
        prefix: &str,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<S3Config, String> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let required = |k: &str| get(k).ok_or_else(|| format!("{k} is not set (S3 image store)"));
        Ok(S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            region: get("AWS_REGION").unwrap_or_else(|| request::REGION_DEFAULT.to_string()),
            endpoint: get("S3_ENDPOINT"),
            access_key_id: required("AWS_ACCESS_KEY_ID")?,
            secret_access_key: required("AWS_SECRET_ACCESS_KEY")?,
            session_token: get("AWS_SESSION_TOKEN"),
            list_page_keys: request::LIST_PAGE_KEYS_MAX,
        })
    }
}

/// The S3 implementation of [`ImageStore`]. Cheap to share; all methods take `&self`.
pub struct S3Store {
    client: Arc<Client>,
    /// Normalized: empty or ending in `/`.
    prefix: String,
    list_page_keys: u16,
    /// Block cache for blob reads ([`S3Store::with_block_cache`]); none: every read is a GET.
    cache: Option<Arc<BlockCache>>,
}

impl S3Store {
    /// Builds the client. No request is sent: call [`S3Store::check_bucket`] (or use
    /// [`S3Store::open_checked`]) to find out whether the bucket and credentials work.
    pub fn open(config: S3Config) -> store::Result<S3Store> {
        let where_ = format!("s3://{}/{}", config.bucket, config.prefix);
        let bad = |message: String| store::Error::Remote {
            key: where_.clone(),
            message,
        };
        let prefix = request::normalize_store_prefix(&config.prefix).map_err(bad)?;
        let (bucket, endpoint) =
            request::bucket(config.endpoint.as_deref(), &config.region, &config.bucket)
                .map_err(bad)?;
        let credentials = match config.session_token {
            Some(t) => rusty_s3::Credentials::new_with_token(
                config.access_key_id,
                config.secret_access_key,
                t,
            ),
            None => rusty_s3::Credentials::new(config.access_key_id, config.secret_access_key),
        };
        let list_page_keys = config.list_page_keys.clamp(1, request::LIST_PAGE_KEYS_MAX);
        let client = Arc::new(Client::new(bucket, credentials, endpoint));
        Ok(S3Store {
            client,
            prefix,
            list_page_keys,
            cache: None,
        })
    }

    /// Reads blobs through `cache` (`--image-cache-size-bytes`,
    /// `--image-cache-block-size-bytes`): repeat reads are served from memory, adjacent
    /// misses coalesce into one ranged GET, concurrent misses of a block fetch it once, and
    /// opening a blob is one GET of its first block instead of a HEAD.
    pub fn with_block_cache(mut self, cache: Arc<BlockCache>) -> S3Store {
        self.cache = Some(cache);
        self
    }

    /// HTTP requests this store has sent (every attempt counts).
    pub fn requests_sent(&self) -> u64 {
        self.client.requests_sent()
    }

    /// Connections this store has opened (new TCP/TLS handshakes; requests on a pooled
    /// connection open none).
    pub fn connections_opened(&self) -> u64 {
        self.client.connections_opened()
    }

    /// One log line of counters: the block cache's, requests sent and connections opened.
    pub fn stats_line(&self) -> String {
        let (requests, opened) = (self.requests_sent(), self.connections_opened());
        let per_1000 = opened as f64 * 1000.0 / requests.max(1) as f64;
        let cache = match self.cache_stats() {
            Some(c) => format!("image cache: {c}; "),
            None => String::new(),
        };
        format!("{cache}s3: {requests} requests, {opened} connections opened ({per_1000:.1} per 1000 requests)")
    }

    /// The block cache's counters, if there is a cache.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(|c| c.stats())
    }

    /// [`S3Store::open`] followed by [`S3Store::check_bucket`]: what a server does at startup.
    pub fn open_checked(config: S3Config) -> store::Result<S3Store> {
        let s = S3Store::open(config)?;
        s.check_bucket()?;
        Ok(s)
    }

    pub fn bucket(&self) -> &str {
        self.client.bucket().name()
    }

    /// The normalized key prefix inside the bucket (empty or ending in `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn endpoint(&self) -> &str {
        self.client.endpoint()
    }

    /// Checks that the bucket exists and the credentials may list it (one ListObjectsV2 with
    /// max-keys=1 on the prefix), then that conditional writes work: a probe object created
    /// twice with `If-None-Match: *` must give Created, then AlreadyExists. It is deleted
    /// after. Every failure says what to fix.
    pub fn check_bucket(&self) -> store::Result<()> {
        let full = self.prefix.clone();
        let sign = |b: &_, c: &_| request::list(b, c, &full, None, 1);
        self.client
            .call("check bucket", sign, &[], LIST_BODY_BYTES_MAX, |r| {
                expect_success(r).and_then(|r| xml::parse_list(&String::from_utf8_lossy(&r.body)))
            })
            .map_err(|f| self.rekey_for_check(store_error(&self.client, "", &full, f)))?;
        self.probe_conditional_create()
    }

    /// Errors of the bucket check concern the whole store, not an object: key them by the
    /// store's description and drop the object path the message would otherwise repeat.
    fn rekey_for_check(&self, e: store::Error) -> store::Error {
        let store_name = self.describe();
        let trim = |m: String| match m.strip_prefix(store_name.as_str()) {
            Some(rest) => rest.trim_start_matches(':').trim_start().to_string(),
            None => m,
        };
        let key = store_name.clone();
        match e {
            store::Error::Remote { message, .. } => store::Error::Remote {
                key,
                message: trim(message),
            },
            store::Error::Unavailable { message, .. } => store::Error::Unavailable {
                key,
                message: trim(message),
            },
            other => other,
        }
    }

    fn probe_conditional_create(&self) -> store::Result<()> {
        let key = format!(
            "{PROBE_KEY_PREFIX}{:032x}",
            crate::catalog::keys::random_u128()
        );
        // Different bodies: should the second create be retried after an attempt whose
        // 412 was lost, the read-back in `create_if_absent` must not take the first
        // object for its own.
        let body = |n: u8| format!("mvps conditional-write probe {n}; safe to delete");
        let first = self.create_if_absent(&key, body(1).as_bytes());
        let second = first
            .as_ref()
            .ok()
            .map(|_| self.create_if_absent(&key, body(2).as_bytes()));
        let cleanup = self.delete(&key);
        let unsupported = |detail: &str| store::Error::Remote {
            key: key.clone(),
            message: format!(
                "s3://{}/{}{key}: {detail}. mvps needs conditional writes (PUT with \
                 If-None-Match: *) to fence manifest writers (DESIGN §3); use a store that \
                 supports them (AWS S3, R2, MinIO, recent SeaweedFS)",
                self.bucket(),
                self.prefix
            ),
        };
        match (first, second) {
            (Ok(CreateOutcome::Created), Some(Ok(CreateOutcome::AlreadyExists))) => cleanup,
            (Ok(CreateOutcome::Created), Some(Ok(CreateOutcome::Created))) => Err(unsupported(
                "the store ignored If-None-Match and overwrote the probe",
            )),
            (Ok(CreateOutcome::AlreadyExists), _) => {
                Err(unsupported("a fresh probe key was reported as existing"))
            }
            (Err(e), _) | (_, Some(Err(e))) => match &e {
                store::Error::Remote { message, .. } if message.contains("not implement") => {
                    Err(unsupported(&e.to_string()))
                }
                _ => Err(e),
            },
            (Ok(_), None) => unreachable!("second probe runs after a successful first"),
        }
    }

    /// Deletes many objects with DeleteObjects, [`request::DELETE_BATCH_KEYS_MAX`] per
    /// request. Missing objects are not an error. Every key is checked before anything is
    /// deleted. Fails naming the first key the store refused to delete.
    pub fn delete_many<K: AsRef<str>>(&self, keys: &[K]) -> store::Result<()> {
        let full: Vec<String> = keys
            .iter()
            .map(|k| self.full_key(k.as_ref()))
            .collect::<Result<_, _>>()?;
        for batch in full.chunks(request::DELETE_BATCH_KEYS_MAX) {
            self.delete_batch(batch)?;
        }
        Ok(())
    }

    fn delete_batch(&self, batch: &[String]) -> store::Result<()> {
        let (_, body) =
            request::delete_objects(self.client.bucket(), self.client.credentials(), batch);
        let sign = |b: &_, c: &_| request::delete_objects(b, c, batch).0;
        let failed = self
            .client
            .call("delete objects", sign, &body, SMALL_BODY_BYTES_MAX, |r| {
                expect_success(r)
                    .and_then(|r| xml::parse_delete_objects(&String::from_utf8_lossy(&r.body)))
            })
            .map_err(|f| store_error(&self.client, self.relative(&batch[0]), &batch[0], f))?;
        // S3 reports a missing key as deleted; anything listed here is a real refusal.
        match failed.first() {
            None => Ok(()),
            Some((full_key, why)) => Err(store::Error::Remote {
                key: self.relative(full_key).to_string(),
                message: format!(
                    "s3://{}/{full_key}: not deleted: {why} ({} of {} keys in the batch failed)",
                    self.bucket(),
                    failed.len(),
                    batch.len()
                ),
            }),
        }
    }

    /// Checks a key and prepends the store prefix.
    fn full_key(&self, key: &str) -> store::Result<String> {
        if !request::is_valid_key(key) || self.prefix.len() + key.len() > request::KEY_BYTES_MAX {
            return Err(store::Error::BadKey {
                key: key.to_string(),
            });
        }
        Ok(format!("{}{key}", self.prefix))
    }

    fn relative<'a>(&self, full_key: &'a str) -> &'a str {
        full_key
            .strip_prefix(self.prefix.as_str())
            .unwrap_or(full_key)
    }

    fn error(&self, key: &str, full_key: &str, f: Failure) -> store::Error {
        store_error(&self.client, key, full_key, f)
    }

    /// HEAD: the object's size.
    fn head_size(&self, key: &str, full_key: &str) -> store::Result<u64> {
        let sign = |b: &_, c: &_| request::head(b, c, full_key);
        self.client
            .call("head", sign, &[], 0, |r| {
                let r = expect_success(r)?;
                r.content_length
                    .ok_or_else(|| xml_parse_error("HeadObject", "no Content-Length"))
            })
            .map_err(|f| self.error(key, full_key, f))
    }

    /// One ListObjectsV2 page.
    fn list_page(
        &self,
        full_prefix: &str,
        token: Option<&str>,
        max_keys: u16,
    ) -> store::Result<xml::ListPage> {
        let sign = |b: &_, c: &_| request::list(b, c, full_prefix, token, max_keys);
        self.client
            .call("list", sign, &[], LIST_BODY_BYTES_MAX, |r| {
                expect_success(r).and_then(|r| xml::parse_list(&String::from_utf8_lossy(&r.body)))
            })
            .map_err(|f| self.error(self.relative(full_prefix), full_prefix, f))
    }

    /// After a conditional create saw 412 although an earlier attempt may have gone through
    /// (a timeout, a 5xx), the object found may be our own: it is if it holds our bytes.
    /// Manifests carry the writer id and generation, so another writer's never match ours.
    fn created_by_us(&self, key: &str, data: &[u8]) -> store::Result<bool> {
        match self.get(key) {
            Ok(existing) => Ok(existing == data),
            Err(store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Turns a non-2xx response into its error.
fn expect_success(r: Response) -> Result<Response, Error> {
    if r.is_success() {
        Ok(r)
    } else {
        Err(xml::status_error(r.status, &r.body))
    }
}

fn xml_parse_error(what: &'static str, message: &str) -> Error {
    Error::Parse {
        what,
        message: message.to_string(),
    }
}

fn store_error(client: &Client, key: &str, full_key: &str, f: Failure) -> store::Error {
    let target = error::Target {
        endpoint: client.endpoint(),
        bucket: client.bucket().name(),
        key,
        full_key,
    };
    error::to_store_error(&f.last, target, f.attempts, f.exhausted)
}

impl ImageStore for S3Store {
    fn get(&self, key: &str) -> store::Result<Vec<u8>> {
        let full = self.full_key(key)?;
        let sign = |b: &_, c: &_| request::get(b, c, &full, None);
        self.client
            .call("get", sign, &[], OBJECT_GET_BYTES_MAX, |r| {
                expect_success(r).map(|r| r.body)
            })
            .map_err(|f| self.error(key, &full, f))
    }

    fn reads_ahead(&self) -> bool {
        self.cache.as_ref().is_some_and(|c| c.capacity_bytes() > 0)
    }

    fn open_blob(&self, key: &str) -> store::Result<Box<dyn BlobReader>> {
        let full = self.full_key(key)?;
        let Some(cache) = self.cache.as_ref().filter(|c| c.capacity_bytes() > 0) else {
            let size = self.head_size(key, &full)?;
            let b = blob::S3Blob::new(self.client.clone(), key.to_string(), full, size);
            return Ok(Box::new(b));
        };
        // Opened before, first block still cached: no request. Otherwise one GET for the
        // size and the first block (header and index of a layer).
        let size = match cache.known_size(&full) {
            Some(size) => size,
            None => {
                let bytes = cache.open_bytes();
                match blob::S3Blob::open_first_block(&self.client, key, &full, bytes)? {
                    Some((size, data)) => {
                        cache.insert(&full, 0, data);
                        size
                    }
                    None => self.head_size(key, &full)?,
                }
            }
        };
        let b = blob::S3Blob::new(self.client.clone(), key.to_string(), full.clone(), size);
        Ok(Box::new(cache.wrap_source(&full, Box::new(b))))
    }

    fn put(&self, key: &str, data: &[u8]) -> store::Result<()> {
        let full = self.full_key(key)?;
        let md5 = md5::content_md5(data);
        let sign = |b: &_, c: &_| request::put(b, c, &full, false, &md5);
        self.client
            .call("put", sign, data, SMALL_BODY_BYTES_MAX, |r| {
                expect_success(r).map(drop)
            })
            .map_err(|f| self.error(key, &full, f))
    }

    fn put_file(&self, key: &str, path: &Path) -> store::Result<()> {
        let full = self.full_key(key)?;
        multipart::put_file(self, key, &full, path)
    }

    fn create_if_absent(&self, key: &str, data: &[u8]) -> store::Result<CreateOutcome> {
        let full = self.full_key(key)?;
        let md5 = md5::content_md5(data);
        let sign = |b: &_, c: &_| request::put(b, c, &full, true, &md5);
        let accept = |r: Response| match r.status {
            412 => Ok(CreateOutcome::AlreadyExists),
            _ => expect_success(r).map(|_| CreateOutcome::Created),
        };
        let (outcome, maybe_applied) = self
            .client
            .call_tracked(
                "conditional create",
                sign,
                data,
                SMALL_BODY_BYTES_MAX,
                accept,
            )
            .map_err(|f| self.error(key, &full, f))?;
        if outcome == CreateOutcome::AlreadyExists
            && maybe_applied
            && self.created_by_us(key, data)?
        {
            log::info!("s3 conditional create {full}: an earlier attempt had created it");
            return Ok(CreateOutcome::Created);
        }
        Ok(outcome)
    }

    fn list(&self, prefix: &str, limit: Option<usize>) -> store::Result<Vec<ObjectInfo>> {
        if !request::is_valid_list_prefix(prefix) {
            return Err(store::Error::BadKey {
                key: prefix.to_string(),
            });
        }
        let full_prefix = format!("{}{prefix}", self.prefix);
        let limit = limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..LIST_PAGES_MAX {
            if out.len() >= limit {
                return Ok(out);
            }
            let want = (limit - out.len()).min(usize::from(self.list_page_keys)) as u16;
            let page = self.list_page(&full_prefix, token.as_deref(), want)?;
            for o in page.objects {
                // S3 only returns keys under the prefix; anything else is skipped, not trusted.
                let Some(key) = o.full_key.strip_prefix(self.prefix.as_str()) else {
                    continue;
                };
                out.push(ObjectInfo {
                    key: key.to_string(),
                    size_bytes: o.size_bytes,
                    last_modified_unix: o.last_modified_unix,
                });
            }
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => {
                    out.truncate(limit);
                    return Ok(out);
                }
            }
        }
        Err(store::Error::Remote {
            key: prefix.to_string(),
            message: format!(
                "listing s3://{}/{full_prefix}: more than {LIST_PAGES_MAX} pages",
                self.bucket()
            ),
        })
    }

    fn delete(&self, key: &str) -> store::Result<()> {
        let full = self.full_key(key)?;
        let sign = |b: &_, c: &_| request::delete(b, c, &full);
        let accept = |r: Response| match r.status {
            // Deleting a missing object is not an error (S3 says 204 anyway; some say 404).
            404 if xml::parse_error(&String::from_utf8_lossy(&r.body))
                .code
                .as_deref()
                != Some("NoSuchBucket") =>
            {
                Ok(())
            }
            _ => expect_success(r).map(drop),
        };
        self.client
            .call("delete", sign, &[], SMALL_BODY_BYTES_MAX, accept)
            .map_err(|f| self.error(key, &full, f))
    }

    fn delete_many(&self, keys: &[String]) -> store::Result<()> {
        S3Store::delete_many(self, keys)
    }

    fn list_uploads(&self) -> store::Result<Vec<UploadInfo>> {
        let full_prefix = self.prefix.clone();
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        for _ in 0..LIST_PAGES_MAX {
            let m = markers.as_ref().map(|(k, u)| (k.as_str(), u.as_str()));
            let sign = |b: &_, c: &_| request::list_multipart_uploads(b, c, &full_prefix, m);
            let page = self
                .client
                .call(
                    "list multipart uploads",
                    sign,
                    &[],
                    LIST_BODY_BYTES_MAX,
                    |r| {
                        expect_success(r).and_then(|r| {
                            xml::parse_list_uploads(&String::from_utf8_lossy(&r.body))
                        })
                    },
                )
                .map_err(|f| self.error("", &full_prefix, f))?;
            for u in page.uploads {
                if let Some(key) = u.full_key.strip_prefix(self.prefix.as_str()) {
                    out.push(UploadInfo {
                        key: key.to_string(),
                        upload_id: u.upload_id,
                        initiated_unix: u.initiated_unix,
                    });
                }
            }
            match page.next_markers {
                Some(next) if Some(&next) != markers.as_ref() => markers = Some(next),
                _ => return Ok(out),
            }
        }
        Err(store::Error::Remote {
            key: String::new(),
            message: format!(
                "listing multipart uploads of s3://{}/{full_prefix}: more than \
                 {LIST_PAGES_MAX} pages",
                self.bucket()
            ),
        })
    }

    fn abort_upload(&self, upload: &UploadInfo) -> store::Result<()> {
        let full = self.full_key(&upload.key)?;
        let sign = |b: &_, c: &_| request::abort_multipart(b, c, &full, &upload.upload_id);
        let accept = |r: Response| match r.status {
            // Already completed or aborted: nothing left to abort.
            404 => Ok(()),
            _ => expect_success(r).map(drop),
        };
        self.client
            .call(
                "abort multipart upload",
                sign,
                &[],
                SMALL_BODY_BYTES_MAX,
                accept,
            )
            .map_err(|f| self.error(&upload.key, &full, f))
    }

    fn requests_sent(&self) -> Option<u64> {
        Some(S3Store::requests_sent(self))
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket(), self.prefix)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_faults;
