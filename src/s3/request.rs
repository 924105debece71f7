//! Pure request building: key checks, the bucket URL style, and one signed [`Request`] per S3
//! operation. Nothing here sends anything; [`super::client`] does.
//!
//! Requests are presigned URLs (rusty-s3): the signature, the credential scope and the
//! signed header names travel in the query string, and the headers we chose to sign
//! (`If-None-Match`, `Content-MD5`) must be sent exactly as signed. Each attempt of a retried request is
//! signed afresh, so a URL never outlives [`PRESIGN_EXPIRES`].
//!
//! rusty-s3 takes the signing time as a `jiff::Timestamp`, a crate we do not depend on, so
//! these builders sign with the current time; rusty-s3's own tests pin its signatures to
//! AWS's published examples, and ours check everything around them (URL style, query,
//! headers).

use rusty_s3::actions::ObjectIdentifier;
use rusty_s3::{Bucket, Credentials, Method, S3Action, UrlStyle};
use std::time::Duration;

/// Lifetime of a presigned URL. Each attempt is signed just before it is sent, so this only
/// has to cover clock skew between us and the store plus the time to start the request.
pub const PRESIGN_EXPIRES: Duration = Duration::from_secs(15 * 60);

/// Keys one DeleteObjects request may carry (the S3 API limit).
pub const DELETE_BATCH_KEYS_MAX: usize = 1000;

/// Keys one ListObjectsV2 page returns at most (the S3 API limit; larger values are clamped).
pub const LIST_PAGE_KEYS_MAX: u16 = 1000;

/// Longest key S3 accepts, in bytes (store prefix included).
pub const KEY_BYTES_MAX: usize = 1024;

/// Default AWS region when `AWS_REGION` is unset.
pub const REGION_DEFAULT: &str = "us-east-1";

/// One signed request, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub url: String,
    /// Headers to send with it; the signed ones among them must not be altered.
    pub headers: Vec<(&'static str, String)>,
}

/// Keys are made of safe path components only: no `..`, no `.`, no empty component, no
/// absolute path, nothing but `[A-Za-z0-9._-]`, and no component starting with `.tmp`.
/// These are exactly the local store's rules (`store::local`), so a key valid on one store
/// is valid on the other; they also keep `..` out of URL paths, which HTTP stacks normalize.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= KEY_BYTES_MAX && key.split('/').all(is_valid_component)
}

use crate::catalog::keys::is_valid_key_component as is_valid_component;

/// A listing prefix: empty, or whole valid components, each followed by `/`, then possibly
/// the start of one more component (`images/`, `blobs/01H`, `images/x.mvps-image/`).
pub fn is_valid_list_prefix(prefix: &str) -> bool {
    if prefix.is_empty() {
        return true;
    }
    let (dirs, last) = match prefix.rfind('/') {
        Some(i) => (&prefix[..i], &prefix[i + 1..]),
        None => ("", prefix),
    };
    // With a '/', everything before the last one must be whole components ("/" alone is
    // an empty component).
    let dirs_ok = !prefix.contains('/') || dirs.split('/').all(is_valid_component);
    let last_ok = last.is_empty() || is_valid_component(last);
    prefix.len() <= KEY_BYTES_MAX && dirs_ok && last_ok
}

/// The store prefix inside the bucket: empty, or valid components ending in `/`. A prefix
/// given without the trailing `/` gets one (`test` → `test/`), so that keys land in a folder
/// rather than being glued to the prefix (`testimages/…`).
pub fn normalize_store_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if !is_valid_key(trimmed) {
        return Err(format!(
            "S3 prefix {prefix:?}: only [A-Za-z0-9._-] components separated by '/' are allowed"
        ));
    }
    Ok(format!("{trimmed}/"))
}

/// S3 bucket names: 3 to 63 lowercase letters, digits, dots and hyphens (AWS's rules for new
/// buckets), starting and ending with a letter or digit. Checked before a name goes into a
/// host name or a URL path.
pub fn is_valid_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b".-".contains(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// The endpoint used when none is configured: AWS's regional endpoint.
pub fn aws_endpoint(region: &str) -> String {
    format!("https://s3.{region}.amazonaws.com")
}

/// The bucket handle: a configured endpoint (MinIO, SeaweedFS, R2, …) is addressed
/// path-style (`http://host:port/bucket/key`), because such stores rarely have wildcard DNS;
/// AWS is addressed virtual-hosted style (`https://bucket.s3.region.amazonaws.com/key`),
/// which AWS requires for new buckets. Returns the bucket and the endpoint, for messages.
pub fn bucket(
    endpoint: Option<&str>,
    region: &str,
    name: &str,
) -> Result<(Bucket, String), String> {
    if !is_valid_bucket_name(name) {
        return Err(format!(
            "S3 bucket name {name:?}: expected 3 to 63 lowercase letters, digits, '.' or '-'"
        ));
    }
    let (endpoint, style) = match endpoint {
        Some(e) => (e.trim_end_matches('/').to_string(), UrlStyle::Path),
        None => (aws_endpoint(region), UrlStyle::VirtualHost),
    };
    let url = endpoint
        .parse()
        .map_err(|e| format!("S3_ENDPOINT {endpoint:?}: {e}"))?;
    let b = Bucket::new(url, style, name.to_string(), region.to_string())
        .map_err(|e| format!("S3 endpoint {endpoint:?} with bucket {name:?}: {e}"))?;
    Ok((b, endpoint))
}

fn sign<'a>(
    action: &impl S3Action<'a>,
    method: Method,
    headers: Vec<(&'static str, String)>,
) -> Request {
    Request {
        method,
        url: action.sign(PRESIGN_EXPIRES).to_string(),
        headers,
    }
}

/// GET of a whole object, or of `len` bytes at `offset` (`len > 0`).
pub fn get(b: &Bucket, c: &Credentials, full_key: &str, range: Option<(u64, u64)>) -> Request {
    let action = b.get_object(Some(c), full_key);
    let headers = match range {
        Some((offset, len)) => {
            debug_assert!(len > 0);
            vec![("Range", format!("bytes={}-{}", offset, offset + len - 1))]
        }
        None => Vec::new(),
    };
    sign(&action, Method::Get, headers)
}

pub fn head(b: &Bucket, c: &Credentials, full_key: &str) -> Request {
    sign(&b.head_object(Some(c), full_key), Method::Head, Vec::new())
}

/// PUT of a whole object whose body has the `Content-MD5` value `content_md5`
/// ([`super::md5::content_md5`]); with `if_none_match`, only if no object exists under the
/// key. Both headers are signed, so nothing on the way can strip them: not `If-None-Match`
/// (which would turn a fenced write into an overwrite), nor `Content-MD5` (the store checks
/// the body against it, so a body cut short is refused rather than stored shorter; S3.md,
/// *Request integrity*).
pub fn put(
    b: &Bucket,
    c: &Credentials,
    full_key: &str,
    if_none_match: bool,
    content_md5: &str,
) -> Request {
    let mut action = b.put_object(Some(c), full_key);
    let mut headers = Vec::new();
    if if_none_match {
        action.headers_mut().insert("if-none-match", "*");
        headers.push(("If-None-Match", "*".to_string()));
    }
    action.headers_mut().insert("content-md5", content_md5);
    headers.push((CONTENT_MD5, content_md5.to_string()));
    sign(&action, Method::Put, headers)
}

/// The header every request with a body carries (the client checks; see [`put`]).
pub const CONTENT_MD5: &str = "Content-MD5";

pub fn delete(b: &Bucket, c: &Credentials, full_key: &str) -> Request {
    sign(
        &b.delete_object(Some(c), full_key),
        Method::Delete,
        Vec::new(),
    )
}

/// One ListObjectsV2 page of keys starting with `full_prefix`.
pub fn list(
    b: &Bucket,
    c: &Credentials,
    full_prefix: &str,
    continuation_token: Option<&str>,
    max_keys: u16,
) -> Request {
    let mut action = b.list_objects_v2(Some(c));
    if !full_prefix.is_empty() {
        action.with_prefix(full_prefix);
    }
    if let Some(t) = continuation_token {
        action.with_continuation_token(t);
    }
    action.with_max_keys(usize::from(max_keys.clamp(1, LIST_PAGE_KEYS_MAX)));
    sign(&action, Method::Get, Vec::new())
}

/// DeleteObjects (quiet: the answer lists only failures) of up to
/// [`DELETE_BATCH_KEYS_MAX`] keys. Returns the request and its XML body; S3 requires the
/// body's MD5 in `Content-MD5`, which is among the headers.
pub fn delete_objects(b: &Bucket, c: &Credentials, full_keys: &[String]) -> (Request, Vec<u8>) {
    assert!(!full_keys.is_empty() && full_keys.len() <= DELETE_BATCH_KEYS_MAX);
    let ids: Vec<ObjectIdentifier> = full_keys
        .iter()
        .map(|k| ObjectIdentifier::new(k.clone()))
        .collect();
    let mut action = b.delete_objects(Some(c), ids.iter());
    action.set_quiet(true);
    let url = action.sign(PRESIGN_EXPIRES).to_string();
    let (body, md5) = action.body_with_md5();
    let headers = vec![
        (CONTENT_MD5, md5),
        ("Content-Type", "application/xml".to_string()),
    ];
    (
        Request {
            method: Method::Post,
            url,
            headers,
        },
        body.into_bytes(),
    )
}

/// Signs `url` (a bucket or object URL) with `query` (sorted by name, then value), then
/// writes each parameter named in `bare` without its `=`: S3 subresources such as `uploads`
/// take no value, and some S3 implementations refuse one (`uploads=1`, as rusty-s3 writes
/// it). SigV4 signs a parameter without a value as `name=`, so the signature holds.
fn sign_canonical(
    b: &Bucket,
    c: &Credentials,
    method: Method,
    url: url::Url,
    query: &[(&str, &str)],
    bare: &[&str],
) -> Request {
    debug_assert!(query.windows(2).all(|w| w[0] <= w[1]), "sorted query");
    let signed = rusty_s3::signing::sign(
        &jiff::Timestamp::now(),
        method,
        url,
        c.key(),
        c.secret(),
        c.token(),
        b.region(),
        PRESIGN_EXPIRES.as_secs(),
        query.iter().copied(),
        std::iter::empty(),
    );
    let mut url = signed.to_string();
    if let Some(q) = url.find('?') {
        let params: Vec<&str> = url[q + 1..]
            .split('&')
            .map(|p| match p.strip_suffix('=') {
                Some(name) if bare.contains(&name) => name,
                _ => p,
            })
            .collect();
        url = format!("{}?{}", &url[..q], params.join("&"));
    }
    Request {
        method,
        url,
        headers: Vec::new(),
    }
}

/// CreateMultipartUpload: `POST /key?uploads`, the subresource without a value.
pub fn create_multipart(b: &Bucket, c: &Credentials, full_key: &str) -> Request {
    let url = b.object_url(full_key);
    sign_canonical(b, c, Method::Post, url, &[("uploads", "")], &["uploads"])
}

/// Uploads one ListMultipartUploads page may list (the S3 API limit).
pub const LIST_UPLOADS_PAGE_MAX: u16 = 1000;

/// One page of ListMultipartUploads (`GET /?uploads&prefix=…`) of the uploads in progress
/// under `full_prefix`, after the markers of the previous page.
pub fn list_multipart_uploads(
    b: &Bucket,
    c: &Credentials,
    full_prefix: &str,
    markers: Option<(&str, &str)>,
) -> Request {
    let max = LIST_UPLOADS_PAGE_MAX.to_string();
    let mut query = Vec::new();
    if let Some((key, _)) = markers {
        query.push(("key-marker", key));
    }
    query.push(("max-uploads", max.as_str()));
    if !full_prefix.is_empty() {
        query.push(("prefix", full_prefix));
    }
    if let Some((_, upload_id)) = markers {
        query.push(("upload-id-marker", upload_id));
    }
    query.push(("uploads", ""));
    let url = b.base_url().clone();
    sign_canonical(b, c, Method::Get, url, &query, &["uploads"])
}

/// Part numbers start at 1 (S3 allows 1..=10000). `content_md5` of the part's body is signed,
/// as in [`put`].
pub fn upload_part(
    b: &Bucket,
    c: &Credentials,
    full_key: &str,
    part: u16,
    upload_id: &str,
    content_md5: &str,
) -> Request {
    let mut action = b.upload_part(Some(c), full_key, part, upload_id);
    action.headers_mut().insert("content-md5", content_md5);
    sign(
        &action,
        Method::Put,
        vec![(CONTENT_MD5, content_md5.to_string())],
    )
}

/// Completes an upload from its parts' ETags, in part-number order (1, 2, …).
pub fn complete_multipart(
    b: &Bucket,
    c: &Credentials,
    full_key: &str,
    upload_id: &str,
    etags: &[String],
) -> (Request, Vec<u8>) {
    let action = b.complete_multipart_upload(
        Some(c),
        full_key,
        upload_id,
        etags.iter().map(|e| e.as_str()),
    );
    let url = action.sign(PRESIGN_EXPIRES).to_string();
    let body = action.body();
    // Not signed (rusty-s3 builds this body only after signing); checked by the store all
    // the same.
    let headers = vec![
        (CONTENT_MD5, super::md5::content_md5(body.as_bytes())),
        ("Content-Type", "application/xml".to_string()),
    ];
    (
        Request {
            method: Method::Post,
            url,
            headers,
        },
        body.into_bytes(),
    )
}

pub fn abort_multipart(b: &Bucket, c: &Credentials, full_key: &str, upload_id: &str) -> Request {
    sign(
        &b.abort_multipart_upload(Some(c), full_key, upload_id),
        Method::Delete,
        Vec::new(),
    )
}

/// CreateBucket (used by test harnesses; the server never creates its bucket).
pub fn create_bucket(b: &Bucket, c: &Credentials) -> (Request, Vec<u8>) {
    let action = b.create_bucket(c);
    let body = action.body().into_bytes();
    let headers = vec![(CONTENT_MD5, super::md5::content_md5(&body))];
    (sign(&action, Method::Put, headers), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        )
    }

    #[test]
    fn subresources_are_sent_without_a_value() {
        let (b, _) = bucket(Some("http://127.0.0.1:9000"), "us-east-1", "bkt").unwrap();
        let r = create_multipart(&b, &creds(), "p/blobs/x");
        assert_eq!(r.method, Method::Post);
        let query = r.url.split_once('?').unwrap().1;
        let params: Vec<&str> = query.split('&').collect();
        assert!(params.contains(&"uploads"), "{}", r.url);
        assert!(!r.url.contains("uploads="), "{}", r.url);
        assert!(r.url.starts_with("http://127.0.0.1:9000/bkt/p/blobs/x?"));
        let r = list_multipart_uploads(&b, &creds(), "p/", Some(("p/k", "id1")));
        let query = r.url.split_once('?').unwrap().1;
        let params: Vec<&str> = query.split('&').collect();
        for want in [
            "uploads",
            "prefix=p%2F",
            "key-marker=p%2Fk",
            "upload-id-marker=id1",
        ] {
            assert!(params.contains(&want), "{want} in {}", r.url);
        }
        assert!(
            r.url.starts_with("http://127.0.0.1:9000/bkt/?")
                || r.url.starts_with("http://127.0.0.1:9000/bkt?")
        );
    }

    #[test]
    fn keys() {
        for ok in [
            "blobs/a.mvps-blob",
            "images/x.mvps-image/ffff.json",
            "a",
            "p/.probe/x",
        ] {
            assert!(is_valid_key(ok), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "/etc/passwd",
            "a//b",
            "a/./b",
            ".tmp/x",
            "a/",
            "a b",
            "a/..",
            "é",
            "a?b",
            "a%2e",
        ] {
            assert!(!is_valid_key(bad), "{bad}");
        }
        assert!(!is_valid_key(&"a".repeat(KEY_BYTES_MAX + 1)));
    }

    #[test]
    fn list_prefixes() {
        for ok in ["", "images/", "blobs/01H", "images/x.mvps-image/", "b"] {
            assert!(is_valid_list_prefix(ok), "{ok}");
        }
        for bad in [
            "../", "a//", "/", "/a", "a/../b/", "..", "a/..", "a b/", "x/.tmpq",
        ] {
            assert!(!is_valid_list_prefix(bad), "{bad}");
        }
    }

    #[test]
    fn store_prefixes() {
        assert_eq!(normalize_store_prefix("").unwrap(), "");
        assert_eq!(normalize_store_prefix("/").unwrap(), "");
        assert_eq!(normalize_store_prefix("test/").unwrap(), "test/");
        assert_eq!(normalize_store_prefix("test").unwrap(), "test/");
        assert_eq!(normalize_store_prefix("a/b//").unwrap(), "a/b/");
        for bad in ["../", "/abs/", "a/../b/", "a b/"] {
            assert!(normalize_store_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bucket_names() {
        assert!(is_valid_bucket_name("mvps-test.1"));
        for bad in ["ab", "-ab", "ab-", "Upper", "a_b", "a/b", &"a".repeat(64)] {
            assert!(!is_valid_bucket_name(bad), "{bad}");
        }
    }

    #[test]
    fn url_styles() {
        let (b, ep) = bucket(None, "eu-west-1", "mybucket").unwrap();
        assert_eq!(ep, "https://s3.eu-west-1.amazonaws.com");
        let r = get(&b, &creds(), "test/blobs/a.mvps-blob", None);
        assert!(
            r.url
                .starts_with("https://mybucket.s3.eu-west-1.amazonaws.com/test/blobs/a.mvps-blob?"),
            "{}",
            r.url
        );
        assert!(
            r.url.contains("X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F"),
            "{}",
            r.url
        );
        assert!(
            r.url.contains("%2Feu-west-1%2Fs3%2Faws4_request"),
            "{}",
            r.url
        );

        let (b, ep) = bucket(Some("http://127.0.0.1:8333/"), "us-east-1", "mybucket").unwrap();
        assert_eq!(ep, "http://127.0.0.1:8333");
        let r = head(&b, &creds(), "test/x");
        assert!(
            r.url.starts_with("http://127.0.0.1:8333/mybucket/test/x?"),
            "{}",
            r.url
        );
        assert_eq!(r.method, Method::Head);

        assert!(bucket(Some("not a url"), "us-east-1", "mybucket").is_err());
        assert!(bucket(Some("ftp://h/"), "us-east-1", "mybucket").is_err());
        assert!(bucket(None, "us-east-1", "Bad_Bucket").is_err());
    }

    #[test]
    fn puts_sign_if_none_match_and_content_md5() {
        let (b, _) = bucket(Some("http://h:1"), "us-east-1", "bkt").unwrap();
        let md5 = super::super::md5::content_md5(b"body");
        let r = put(&b, &creds(), "k", true, &md5);
        assert!(
            r.url
                .contains("X-Amz-SignedHeaders=content-md5%3Bhost%3Bif-none-match"),
            "{}",
            r.url
        );
        assert_eq!(
            r.headers,
            vec![
                ("If-None-Match", "*".to_string()),
                ("Content-MD5", md5.clone())
            ]
        );
        let r = put(&b, &creds(), "k", false, &md5);
        assert!(
            r.url.contains("X-Amz-SignedHeaders=content-md5%3Bhost&"),
            "{}",
            r.url
        );
        assert_eq!(r.headers, vec![("Content-MD5", md5.clone())]);
        let r = upload_part(&b, &creds(), "k", 2, "up1", &md5);
        assert!(
            r.url.contains("X-Amz-SignedHeaders=content-md5%3Bhost&"),
            "{}",
            r.url
        );
        assert_eq!(r.headers, vec![("Content-MD5", md5)]);
    }

    #[test]
    fn ranges_and_lists() {
        let (b, _) = bucket(Some("http://h:1"), "us-east-1", "bkt").unwrap();
        let r = get(&b, &creds(), "k", Some((10, 5)));
        assert_eq!(r.headers, vec![("Range", "bytes=10-14".to_string())]);
        let r = list(&b, &creds(), "test/images/", Some("tok/+="), 5000);
        assert!(r.url.contains("list-type=2"), "{}", r.url);
        assert!(r.url.contains("prefix=test%2Fimages%2F"), "{}", r.url);
        assert!(r.url.contains("max-keys=1000"), "{}", r.url);
        assert!(
            r.url.contains("continuation-token=tok%2F%2B%3D"),
            "{}",
            r.url
        );
    }

    #[test]
    fn batch_delete_and_multipart_bodies() {
        let (b, _) = bucket(Some("http://h:1"), "us-east-1", "bkt").unwrap();
        let keys = vec!["t/a".to_string(), "t/b".to_string()];
        let (r, body) = delete_objects(&b, &creds(), &keys);
        assert_eq!(r.method, Method::Post);
        assert!(r.url.contains("delete"), "{}", r.url);
        let body = String::from_utf8(body).unwrap();
        assert!(
            body.contains("<Key>t/a</Key>") && body.contains("<Quiet>true</Quiet>"),
            "{body}"
        );
        assert!(r
            .headers
            .iter()
            .any(|(h, v)| *h == "Content-MD5" && v.len() == 24));

        let etags = vec!["\"e1\"".to_string(), "\"e2\"".to_string()];
        let (r, body) = complete_multipart(&b, &creds(), "t/k", "up1", &etags);
        assert!(r.url.contains("uploadId=up1"), "{}", r.url);
        let md5 = &r.headers.iter().find(|(h, _)| *h == CONTENT_MD5).unwrap().1;
        assert_eq!(md5, &super::super::md5::content_md5(&body));
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains("<PartNumber>2</PartNumber>"), "{body}");
        let r = upload_part(&b, &creds(), "t/k", 3, "up1", "x");
        assert!(
            r.url.contains("partNumber=3") && r.url.contains("uploadId=up1"),
            "{}",
            r.url
        );
    }
}
