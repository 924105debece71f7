//! `mvps-te --image-store s3` refuses to start on a store it cannot use, with one clear line
//! on stderr and a non-zero exit: wrong secret, unknown access key, missing bucket, and a
//! missing credential variable. A correct configuration starts and serves (so the failures
//! are about the one thing each case breaks).

mod s3_common;

use mvps_conformance::server::base_command;
use mvps_conformance::token;
use mvps_conformance::tools::{run, Output};
use s3_common::{PREFIX, S3};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Runs `mvps-te` against `bucket` with the store's environment changed by `edit`; it must
/// exit non-zero on its own.
fn start_fails(s3: &S3, bucket: &str, edit: impl Fn(&mut Vec<(&'static str, String)>)) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut env = s3.env();
    edit(&mut env);
    let mut c = base_command(Some(token::SECRET));
    c.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--image-store", "s3", "--image-store-s3-bucket", bucket])
        .args(["--image-store-s3-prefix", PREFIX]);
    c.envs(env.iter().map(|(k, v)| (k, v)));
    run(&mut c, T).fails()
}

/// The single line of stderr, which must be the startup error.
#[track_caller]
fn one_line_error(out: &Output) -> String {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr: {out}");
    assert!(lines[0].starts_with("mvps-te: error: "), "{out}");
    assert_eq!(out.status.code(), Some(1), "{out}");
    lines[0].to_string()
}

fn set(env: &mut [(&'static str, String)], key: &str, value: &str) {
    env.iter_mut().find(|(k, _)| *k == key).unwrap().1 = value.to_string();
}

#[test]
fn wrong_secret_key_is_one_clear_line() {
    let s3 = S3::new();
    let out = start_fails(&s3, &s3.bucket, |e| {
        set(e, "AWS_SECRET_ACCESS_KEY", "not-the-secret")
    });
    let line = one_line_error(&out);
    assert!(line.contains("AWS_SECRET_ACCESS_KEY"), "{line}");
    assert!(line.contains("SignatureDoesNotMatch"), "{line}");
    assert!(line.contains(&s3.bucket), "{line}");
    assert!(
        !line.contains("not-the-secret"),
        "the secret leaked: {line}"
    );
}

#[test]
fn unknown_access_key_is_one_clear_line() {
    let s3 = S3::new();
    let out = start_fails(&s3, &s3.bucket, |e| {
        set(e, "AWS_ACCESS_KEY_ID", "AKIANOBODY")
    });
    let line = one_line_error(&out);
    assert!(line.contains("AWS_ACCESS_KEY_ID"), "{line}");
    assert!(line.contains("InvalidAccessKeyId"), "{line}");
}

#[test]
fn missing_bucket_is_one_clear_line() {
    let s3 = S3::new();
    let out = start_fails(&s3, "mvps-no-such-bucket", |_| {});
    let line = one_line_error(&out);
    assert!(
        line.contains("bucket \"mvps-no-such-bucket\" does not exist"),
        "{line}"
    );
    assert!(line.contains(&s3.endpoint), "{line}");
}

#[test]
fn missing_credentials_are_one_clear_line() {
    let s3 = S3::new();
    let out = start_fails(&s3, &s3.bucket, |e| {
        e.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY")
    });
    let line = one_line_error(&out);
    assert!(line.contains("AWS_SECRET_ACCESS_KEY is not set"), "{line}");
}

#[test]
fn a_correct_configuration_starts_and_serves() {
    let s3 = S3::new();
    let s = s3.server().start();
    s.assert_serves();
    assert!(
        s.log().contains(&format!("s3://{}/{PREFIX}", s3.bucket)),
        "{}",
        s.log()
    );
    // The startup probe cleaned up after itself.
    assert_eq!(s3.count("probe/"), 0);
}
