//! Retry behaviour end to end, against a scripted fake endpoint: each accepted connection
//! gets the next scripted reply (or is dropped unanswered), so we can count how many times
//! the client sent a request and check what it made of the answers. Guards against
//! retrying a 412 (which would turn a fencing answer into a success or an error) and
//! against giving up on a 503 / 429 / dropped connection.

use super::*;
use crate::store::Error as E;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// What the fake does with one connection.
enum Reply {
    /// Answer with this status and body.
    Status(u16, &'static str),
    /// Read the request, then close without answering (an ambiguous failure).
    Drop,
}

/// A request's `Content-MD5` header, if any, and its body.
type Received = (Option<String>, Vec<u8>);

struct Fake {
    endpoint: String,
    /// "METHOD /path?query if-none-match" of each request received.
    seen: Arc<Mutex<Vec<String>>>,
    /// The `Content-MD5` header (if any) and the body of each request received.
    bodies: Arc<Mutex<Vec<Received>>>,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn start(script: Vec<Reply>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (log, body_log) = (seen.clone(), bodies.clone());
        let thread = std::thread::spawn(move || {
            for reply in script {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                let mut reader = BufReader::new(stream);
                let (summary, md5, body) = read_request(&mut reader);
                log.lock().unwrap().push(summary);
                body_log.lock().unwrap().push((md5, body));
                let mut stream = reader.into_inner();
                if let Reply::Status(status, body) = reply {
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\
                         Content-Type: application/xml\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(body.as_bytes());
                }
            }
        });
        Fake {
            endpoint,
            seen,
            bodies,
            thread: Some(thread),
        }
    }

    fn store(&self) -> S3Store {
        let mut c = testing::unreachable_config();
        c.endpoint = Some(self.endpoint.clone());
        S3Store::open(c).unwrap()
    }

    /// Waits for the script to be used up and returns what was received.
    fn finish(mut self) -> Vec<String> {
        self.thread.take().unwrap().join().unwrap();
        self.seen.lock().unwrap().clone()
    }

    /// [`Fake::finish`], returning the `Content-MD5` header and body of each request.
    fn finish_bodies(mut self) -> Vec<Received> {
        self.thread.take().unwrap().join().unwrap();
        self.bodies.lock().unwrap().clone()
    }
}

/// Reads one request (head and Content-Length body): its summary, its `Content-MD5` header
/// and its body.
fn read_request(r: &mut BufReader<std::net::TcpStream>) -> (String, Option<String>, Vec<u8>) {
    let mut first = String::new();
    let _ = r.read_line(&mut first);
    let mut length = 0usize;
    let mut conditional = "";
    let mut md5 = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("if-none-match: *") {
            conditional = " if-none-match";
        }
        if lower.starts_with("content-md5:") {
            md5 = line.split_once(':').map(|(_, v)| v.trim().to_string());
        }
    }
    let mut body = vec![0u8; length];
    let _ = r.read_exact(&mut body);
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    (format!("{method} {path}{conditional}"), md5, body)
}

const SLOW_DOWN: &str = "<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>";

#[test]
fn server_errors_and_throttling_are_retried() {
    let fake = Fake::start(vec![
        Reply::Status(503, SLOW_DOWN),
        Reply::Status(429, ""),
        Reply::Drop,
        Reply::Status(500, ""),
        Reply::Status(200, "hello"),
    ]);
    assert_eq!(fake.store().get("images/a/1.json").unwrap(), b"hello");
    assert_eq!(fake.finish().len(), 5);
}

#[test]
fn client_errors_are_not_retried() {
    let fake = Fake::start(vec![Reply::Status(
        400,
        "<Error><Code>InvalidArgument</Code><Message>bad</Message></Error>",
    )]);
    let e = fake.store().put("images/a/1.json", b"x").unwrap_err();
    assert!(matches!(e, E::Remote { .. }), "{e}");
    assert!(e.to_string().contains("InvalidArgument"), "{e}");
    assert_eq!(fake.finish(), vec!["PUT /mvps-unreachable/images/a/1.json"]);
}

#[test]
fn precondition_failed_is_an_answer() {
    let fake = Fake::start(vec![Reply::Status(
        412,
        "<Error><Code>PreconditionFailed</Code>",
    )]);
    let outcome = fake
        .store()
        .create_if_absent("images/a/1.json", b"x")
        .unwrap();
    assert_eq!(outcome, CreateOutcome::AlreadyExists);
    assert_eq!(
        fake.finish(),
        vec!["PUT /mvps-unreachable/images/a/1.json if-none-match"]
    );
}

#[test]
fn conditional_conflict_is_retried() {
    let conflict = "<Error><Code>ConditionalRequestConflict</Code></Error>";
    let fake = Fake::start(vec![Reply::Status(409, conflict), Reply::Status(200, "")]);
    let outcome = fake
        .store()
        .create_if_absent("images/a/1.json", b"x")
        .unwrap();
    assert_eq!(outcome, CreateOutcome::Created);
    assert_eq!(fake.finish().len(), 2);
}

/// The first PUT may have landed although its answer was lost; the retry then sees 412.
/// Whether we won is decided by reading the object back.
#[test]
fn ambiguous_create_checks_whose_object_it_is() {
    let ours = Fake::start(vec![
        Reply::Drop,
        Reply::Status(412, ""),
        Reply::Status(200, "mine"),
    ]);
    let outcome = ours
        .store()
        .create_if_absent("images/a/1.json", b"mine")
        .unwrap();
    assert_eq!(outcome, CreateOutcome::Created);
    let seen = ours.finish();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2], "GET /mvps-unreachable/images/a/1.json");

    let theirs = Fake::start(vec![
        Reply::Drop,
        Reply::Status(412, ""),
        Reply::Status(200, "yours"),
    ]);
    let outcome = theirs
        .store()
        .create_if_absent("images/a/1.json", b"mine")
        .unwrap();
    assert_eq!(outcome, CreateOutcome::AlreadyExists);
    assert_eq!(theirs.finish().len(), 3);
}

#[test]
fn persistent_server_errors_become_unavailable() {
    let script = (0..retry::REQUEST_ATTEMPTS_MAX)
        .map(|_| Reply::Status(503, SLOW_DOWN))
        .collect();
    let fake = Fake::start(script);
    let e = fake.store().get("images/a/1.json").unwrap_err();
    assert!(matches!(e, E::Unavailable { .. }), "{e}");
    assert!(e.to_string().contains("SlowDown"), "{e}");
    assert_eq!(fake.finish().len(), retry::REQUEST_ATTEMPTS_MAX as usize);
}

#[test]
fn conditional_writes_unsupported_fails_the_probe() {
    // The store ignores If-None-Match: both creates succeed. The probe is then deleted.
    let list = r#"<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<IsTruncated>false</IsTruncated></ListBucketResult>"#;
    let fake = Fake::start(vec![
        Reply::Status(200, list),
        Reply::Status(200, ""),
        Reply::Status(200, ""),
        Reply::Status(204, ""),
    ]);
    let e = fake.store().check_bucket().unwrap_err();
    assert!(e.to_string().contains("If-None-Match"), "{e}");
    let seen = fake.finish();
    assert!(
        seen[3].starts_with("DELETE /mvps-unreachable/probe/"),
        "{seen:?}"
    );
}

/// Every request body goes out with its `Content-MD5`, so that the store can refuse a body
/// cut short or damaged on the way (SeaweedFS keeps an empty object when a PUT's connection
/// closes right after the request head, unless the header is there).
#[test]
fn every_body_carries_its_content_md5() {
    let fake = Fake::start(vec![
        Reply::Status(200, ""),
        Reply::Status(200, ""),
        Reply::Status(200, ""),
        Reply::Status(
            200,
            r#"<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></DeleteResult>"#,
        ),
    ]);
    let store = fake.store();
    let manifest = br#"{"format_version": 1, "generation": 2}"#;
    store.put("blobs/a", b"layer bytes").unwrap();
    store.put("blobs/empty", b"").unwrap();
    store.create_if_absent("images/a/1.json", manifest).unwrap();
    store.delete_many(&["blobs/a"]).unwrap();
    let bodies = fake.finish_bodies();
    assert_eq!(bodies.len(), 4);
    for (md5, body) in &bodies {
        assert_eq!(
            md5.as_deref(),
            Some(md5::content_md5(body).as_str()),
            "body {:?}",
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(bodies[2].1, manifest);
    assert_eq!(bodies[1].0.as_deref(), Some("1B2M2Y8AsgTpgAmY7PhCfg=="));
}

/// A body refused as damaged (`BadDigest`) or short (`IncompleteBody`) was not stored: it is
/// sent again, and a conditional create then succeeds.
#[test]
fn refused_bodies_are_sent_again() {
    let bad_digest = "<Error><Code>BadDigest</Code><Message>The Content-MD5 you specified \
                      did not match what we received.</Message></Error>";
    let incomplete = "<Error><Code>IncompleteBody</Code></Error>";
    let fake = Fake::start(vec![
        Reply::Status(400, bad_digest),
        Reply::Status(400, incomplete),
        Reply::Status(200, ""),
    ]);
    let outcome = fake
        .store()
        .create_if_absent("images/a/1.json", b"mine")
        .unwrap();
    assert_eq!(outcome, CreateOutcome::Created);
    assert_eq!(fake.finish().len(), 3);
}
