//! Pure parsers for S3 response bodies. Nothing here does I/O, so every quirk is unit-tested
//! on saved responses.
//!
//! The success bodies (ListObjectsV2, multipart, DeleteObjects) go through rusty-s3's parsers;
//! the error body (`<Error><Code>…`) is small and fixed, so it is read by hand, leniently: a
//! body we cannot read still leaves the HTTP status to act on.

use super::error::Error;
use rusty_s3::actions::{
    CompleteMultipartUploadResponse, CreateMultipartUpload, DeleteObjectsResponse, ListObjectsV2,
};

/// `<Code>`, `<Message>` and `<RequestId>` of an S3 error body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: Option<String>,
    pub message: Option<String>,
    pub request_id: Option<String>,
}

/// Reads an `<Error>` document. Returns the empty `ErrorBody` for anything else (an HTML page
/// from a proxy, an empty HEAD body), so the caller still reports the status.
pub fn parse_error(body: &str) -> ErrorBody {
    let Some(start) = body.find("<Error>") else {
        return ErrorBody::default();
    };
    let inner = &body[start..];
    ErrorBody {
        code: tag_text(inner, "Code"),
        message: tag_text(inner, "Message"),
        request_id: tag_text(inner, "RequestId"),
    }
}

/// Builds the error for an unexpected status from its body.
pub fn status_error(status: u16, body: &[u8]) -> Error {
    let parsed = parse_error(&String::from_utf8_lossy(body));
    Error::Status {
        status,
        code: parsed.code,
        message: parsed.message,
        request_id: parsed.request_id,
    }
}

/// Text of the first `<tag>…</tag>`, unescaped; `None` when absent or empty.
fn tag_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let from = xml.find(&open)? + open.len();
    let len = xml[from..].find(&close)?;
    let text = unescape(xml[from..from + len].trim());
    (!text.is_empty()).then_some(text)
}

/// The five predefined XML entities plus numeric references; anything else is kept verbatim.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.find(';') else { break };
        let decoded = match &rest[1..semi] {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// One listed object, with its key still including the store prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub full_key: String,
    pub size_bytes: u64,
    pub last_modified_unix: u64,
}

/// One page of a ListObjectsV2 listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ListedObject>,
    /// Set when the listing is truncated: pass it back to get the next page.
    pub next_continuation_token: Option<String>,
}

pub fn parse_list(body: &str) -> Result<ListPage, Error> {
    let r = ListObjectsV2::parse_response(body).map_err(|e| Error::Parse {
        what: "ListObjectsV2",
        message: e.to_string(),
    })?;
    let objects = r
        .contents
        .into_iter()
        .map(|c| ListedObject {
            size_bytes: c.size.unwrap_or(0),
            last_modified_unix: c
                .last_modified
                .as_deref()
                .and_then(parse_rfc3339)
                .unwrap_or(0),
            full_key: c.key,
        })
        .collect();
    Ok(ListPage {
        objects,
        next_continuation_token: r.next_continuation_token,
    })
}

pub fn parse_create_multipart(body: &str) -> Result<String, Error> {
    CreateMultipartUpload::parse_response(body)
        .map(|r| r.upload_id().to_string())
        .map_err(|e| Error::Parse {
            what: "CreateMultipartUpload",
            message: e.to_string(),
        })
}

/// S3 may answer CompleteMultipartUpload with 200 and an `<Error>` body (it only finds out
/// late that completing failed), so a 200 is not enough: the body must be a result.
pub fn parse_complete_multipart(body: &str) -> Result<(), Error> {
    if body.contains("<Error>") {
        let e = parse_error(body);
        return Err(Error::Status {
            status: 200,
            code: e.code,
            message: e.message,
            request_id: e.request_id,
        });
    }
    CompleteMultipartUploadResponse::parse(body)
        .map(|_| ())
        .map_err(|e| Error::Parse {
            what: "CompleteMultipartUpload",
            message: e.to_string(),
        })
}

/// The keys a DeleteObjects request failed to delete, with S3's code for each.
pub fn parse_delete_objects(body: &str) -> Result<Vec<(String, String)>, Error> {
    let r = DeleteObjectsResponse::parse(body).map_err(|e| Error::Parse {
        what: "DeleteObjects",
        message: e.to_string(),
    })?;
    Ok(r.errors
        .into_iter()
        .map(|e| (e.key, format!("{}: {}", e.code, e.message)))
        .collect())
}

/// One multipart upload in progress, its key still including the store prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedUpload {
    pub full_key: String,
    pub upload_id: String,
    /// Seconds since the Unix epoch (0 if the store did not say).
    pub initiated_unix: u64,
}

/// One page of a ListMultipartUploads listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadsPage {
    pub uploads: Vec<ListedUpload>,
    /// Set when truncated: (`NextKeyMarker`, `NextUploadIdMarker`) for the next page.
    pub next_markers: Option<(String, String)>,
}

/// Reads a `ListMultipartUploadsResult` (a flat document: read by hand like errors).
pub fn parse_list_uploads(body: &str) -> Result<UploadsPage, Error> {
    let bad = |message: &str| Error::Parse {
        what: "ListMultipartUploads",
        message: message.to_string(),
    };
    if !body.contains("<ListMultipartUploadsResult") {
        return Err(bad("not a ListMultipartUploadsResult document"));
    }
    let mut uploads = Vec::new();
    let mut rest = body;
    while let Some(start) = rest.find("<Upload>") {
        let end = rest[start..]
            .find("</Upload>")
            .ok_or_else(|| bad("<Upload> without </Upload>"))?
            + start;
        let one = &rest[start..end];
        uploads.push(ListedUpload {
            full_key: tag_text(one, "Key").ok_or_else(|| bad("an upload without <Key>"))?,
            upload_id: tag_text(one, "UploadId")
                .ok_or_else(|| bad("an upload without <UploadId>"))?,
            initiated_unix: tag_text(one, "Initiated")
                .as_deref()
                .and_then(parse_rfc3339)
                .unwrap_or(0),
        });
        rest = &rest[end..];
    }
    // The page's own fields come after the uploads in S3's answers, but read them from the
    // part outside <Upload> elements either way.
    let head = body.split("<Upload>").next().unwrap_or("");
    let field = |tag: &str| tag_text(head, tag).or_else(|| tag_text(rest, tag));
    let truncated = field("IsTruncated").as_deref() == Some("true");
    let next_markers = if truncated {
        let key = field("NextKeyMarker").ok_or_else(|| bad("truncated without NextKeyMarker"))?;
        Some((key, field("NextUploadIdMarker").unwrap_or_default()))
    } else {
        None
    };
    Ok(UploadsPage {
        uploads,
        next_markers,
    })
}

/// `2026-01-02T03:04:05.678Z` (or with a `±hh:mm` offset) → seconds since the Unix epoch.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Skip fractional seconds, then read the zone.
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    let offset_secs = match (b.get(i), s.len() - i) {
        (Some(b'Z' | b'z'), 1) => 0,
        (Some(sign @ (b'+' | b'-')), 6) if b[i + 3] == b':' => {
            let off = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let t = days * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    u64::try_from(t).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_uploads() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>p/blobs/b</NextKeyMarker><NextUploadIdMarker>u&amp;2</NextUploadIdMarker>
  <MaxUploads>2</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>p/blobs/a</Key><UploadId>u1</UploadId>
    <Initiated>2026-01-02T03:04:05.000Z</Initiated></Upload>
  <Upload><Key>p/blobs/b</Key><UploadId>u&amp;2</UploadId></Upload>
</ListMultipartUploadsResult>"#;
        let page = parse_list_uploads(body).unwrap();
        assert_eq!(page.uploads.len(), 2);
        assert_eq!(page.uploads[0].full_key, "p/blobs/a");
        assert_eq!(
            page.uploads[0].initiated_unix,
            parse_rfc3339("2026-01-02T03:04:05Z").unwrap()
        );
        assert_eq!(page.uploads[1].upload_id, "u&2");
        assert_eq!(page.next_markers, Some(("p/blobs/b".into(), "u&2".into())));
        let empty = "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>";
        assert_eq!(parse_list_uploads(empty).unwrap().uploads, vec![]);
        assert!(parse_list_uploads("<html/>").is_err());
        assert!(parse_list_uploads("<ListMultipartUploadsResult><Upload><Key>k</Key>").is_err());
    }

    #[test]
    fn error_body_aws() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message>
<Key>test/a &amp; b</Key><RequestId>4442587FB7D0A2F9</RequestId></Error>"#;
        let e = parse_error(body);
        assert_eq!(e.code.as_deref(), Some("NoSuchKey"));
        assert_eq!(
            e.message.as_deref(),
            Some("The specified key does not exist.")
        );
        assert_eq!(e.request_id.as_deref(), Some("4442587FB7D0A2F9"));
    }

    #[test]
    fn error_body_odd_inputs() {
        assert_eq!(parse_error(""), ErrorBody::default());
        assert_eq!(
            parse_error("<html>Bad Gateway</html>"),
            ErrorBody::default()
        );
        let e = parse_error("<Error><Code>X</Code><Message>a &lt;b&gt; &#65;&#x42; &zz;</Message>");
        assert_eq!(e.code.as_deref(), Some("X"));
        assert_eq!(e.message.as_deref(), Some("a <b> AB &zz;"));
        assert_eq!(e.request_id, None);
        let err = status_error(403, b"<Error><Code>AccessDenied</Code></Error>");
        assert_eq!(err.code(), Some("AccessDenied"));
        assert_eq!(err.status(), Some(403));
    }

    #[test]
    fn list_truncated_and_last_page() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Name>b</Name><Prefix>test%2F</Prefix><KeyCount>2</KeyCount><MaxKeys>2</MaxKeys>
<EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
<NextContinuationToken>tok%2B1</NextContinuationToken>
<Contents><Key>test%2Fa%2B1</Key><LastModified>2024-02-29T12:00:00.000Z</LastModified>
<ETag>&quot;x&quot;</ETag><Size>5</Size><StorageClass>STANDARD</StorageClass></Contents>
<Contents><Key>test%2Fb</Key><LastModified>2024-02-29T12:00:01Z</LastModified>
<Size>0</Size></Contents></ListBucketResult>"#;
        let p = parse_list(body).unwrap();
        assert_eq!(p.objects.len(), 2);
        assert_eq!(p.objects[0].full_key, "test/a+1");
        assert_eq!(p.objects[0].size_bytes, 5);
        assert_eq!(p.objects[0].last_modified_unix, 1_709_208_000);
        assert_eq!(p.objects[1].last_modified_unix, 1_709_208_001);
        assert_eq!(p.next_continuation_token.as_deref(), Some("tok%2B1"));

        let last = r#"<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Name>b</Name><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>
<IsTruncated>false</IsTruncated></ListBucketResult>"#;
        let p = parse_list(last).unwrap();
        assert!(p.objects.is_empty());
        assert_eq!(p.next_continuation_token, None);
        assert!(matches!(parse_list("<Error/>"), Err(Error::Parse { .. })));
    }

    #[test]
    fn complete_multipart_error_in_200() {
        let ok = r#"<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Location>l</Location><Bucket>b</Bucket><Key>k</Key><ETag>"e-3"</ETag>
</CompleteMultipartUploadResult>"#;
        parse_complete_multipart(ok).unwrap();
        let bad = "<Error><Code>InternalError</Code><Message>try again</Message></Error>";
        let e = parse_complete_multipart(bad).unwrap_err();
        assert_eq!(e.code(), Some("InternalError"));
    }

    #[test]
    fn multipart_create_and_delete_results() {
        let c = r#"<InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Bucket>b</Bucket><Key>k</Key><UploadId>up-1</UploadId></InitiateMultipartUploadResult>"#;
        assert_eq!(parse_create_multipart(c).unwrap(), "up-1");
        let d = r#"<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Deleted><Key>a</Key></Deleted>
<Error><Key>b</Key><Code>AccessDenied</Code><Message>no</Message></Error></DeleteResult>"#;
        assert_eq!(
            parse_delete_objects(d).unwrap(),
            vec![("b".into(), "AccessDenied: no".into())]
        );
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00.5Z"), Some(951_868_800));
        assert_eq!(
            parse_rfc3339("2000-03-01T01:00:00+01:00"),
            Some(951_868_800)
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), None);
        for bad in [
            "",
            "2000-13-01T00:00:00Z",
            "2000-01-01 00:00:00Z",
            "2000-01-01T00:00:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
