//! mvpsctl: operator tool for mvps.

use argh::FromArgs;
use mvps::auth::{self, Claims};
use mvps::client::{self, sha256, Client};
use mvps::nbd::consts::NBD_ENOSPC;
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// mvps operator tool.
#[derive(FromArgs)]
struct Top {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Token(TokenCmd),
    Txn(TxnCmd),
    Inspect(InspectCmd),
}

/// Print one JSON line describing an image's newest manifest and its write debt (layers,
/// deltas, read depth, stored and live bytes), read straight from the image store.
#[derive(FromArgs)]
#[argh(subcommand, name = "inspect")]
struct InspectCmd {
    /// image id, e.g. disk1.mvps-image
    #[argh(option)]
    image_id: String,
    /// image store kind: local (default) or s3 (credentials and S3_ENDPOINT from the
    /// environment, as for mvps-te)
    #[argh(option, default = "String::from(\"local\")")]
    image_store: String,
    /// directory of the local image store (default mvps-data/image-store)
    #[argh(
        option,
        default = "std::path::PathBuf::from(\"mvps-data/image-store\")"
    )]
    image_store_local_path: std::path::PathBuf,
    /// S3 bucket of the image store
    #[argh(option)]
    image_store_s3_bucket: Option<String>,
    /// key prefix inside the bucket
    #[argh(option, default = "String::new()")]
    image_store_s3_prefix: String,
}

/// Print an export-name token (HS256 JWT) signed with MVPS_TE_JWT_SECRET.
#[derive(FromArgs)]
#[argh(subcommand, name = "token")]
struct TokenCmd {
    /// image id, e.g. disk1.mvps-image (1 to 64 letters, digits, _ or -, then .mvps-image)
    #[argh(option)]
    image_id: String,
    /// image size in bytes, or with a unit: 512M, 1G, 2T (binary units)
    #[argh(option)]
    size: String,
    /// log2 of the page size, 9..=16 (default 12: 4 KiB pages)
    #[argh(option, default = "12")]
    page_size_bits: u32,
    /// optional client id: a new connection with the same id replaces the old one
    #[argh(option)]
    client_id: Option<String>,
    /// lifetime of the token: seconds, or with a unit s, m, h, d (default 30d)
    #[argh(option, default = "String::from(\"30d\")")]
    ttl: String,
}

fn token(t: TokenCmd) -> Result<(), String> {
    // The image id becomes a key in the image store: checked by the catalog's rule first.
    if !mvps::catalog::keys::is_valid_image_id(&t.image_id) {
        return Err(format!(
            "--image-id {:?}: expected 1 to {} letters, digits, _ or -, then {}",
            t.image_id,
            mvps::catalog::keys::IMAGE_ID_LENGTH_MAX,
            mvps::catalog::keys::IMAGE_ID_SUFFIX
        ));
    }
    let secret = std::env::var("MVPS_TE_JWT_SECRET")
        .map_err(|_| "MVPS_TE_JWT_SECRET is not set; export the server's secret".to_string())?;
    if secret.is_empty() {
        return Err("MVPS_TE_JWT_SECRET is empty".into());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = Claims {
        image_id: t.image_id,
        image_size: auth::parse_size(&t.size)?,
        page_size_bits: t.page_size_bits,
        exp: now.saturating_add(mvps::config::parse_duration_secs(&t.ttl)?),
        client_id: t.client_id,
    };
    let tok = auth::mint(&claims, secret.as_bytes()).map_err(|e| e.to_string())?;
    println!("{tok}");
    Ok(())
}

fn inspect(c: InspectCmd) -> Result<(), String> {
    use mvps::config::{open_existing_store, ExistingStore};
    let at = match c.image_store.as_str() {
        "local" => ExistingStore::Local(&c.image_store_local_path),
        "s3" => ExistingStore::S3 {
            bucket: c
                .image_store_s3_bucket
                .as_deref()
                .ok_or("--image-store s3 needs --image-store-s3-bucket")?,
            prefix: &c.image_store_s3_prefix,
        },
        other => return Err(format!("--image-store {other:?}: use local or s3")),
    };
    let store = open_existing_store(at)?;
    let m = mvps::catalog::manifest::load_latest(store.as_ref(), &c.image_id)
        .map_err(|e| format!("image {}: {e}", c.image_id))?
        .ok_or_else(|| format!("image {}: no manifest (never checkpointed)", c.image_id))?;
    let d = mvps::engine::compaction::measure(store.as_ref(), &m)
        .map_err(|e| format!("image {}: {e}", c.image_id))?;
    let out = serde_json::json!({
        "image_id": c.image_id,
        "generation": m.generation,
        "change_count": m.change_count,
        "page_size_bits": m.page_size_bits,
        "layers": d.layers,
        "deltas": d.deltas,
        "read_depth": d.read_depth,
        "read_depth_max": mvps::engine::debt::READ_DEPTH_MAX,
        "stored_bytes": d.stored_bytes,
        "live_bytes": d.live_bytes,
    });
    println!("{out}");
    Ok(())
}

fn main() {
    let top: Top = argh::from_env();
    let r = match top.cmd {
        Cmd::Token(t) => token(t).map_err(Failure::Other),
        Cmd::Txn(t) => txn(t),
        Cmd::Inspect(i) => inspect(i).map_err(Failure::Other),
    };
    if let Err(f) = r {
        let (code, msg) = match f {
            Failure::Other(m) => (EXIT_ERROR, m),
            Failure::Mismatch(m) => (EXIT_MISMATCH, m),
            Failure::Conflict(m) => (EXIT_CONFLICT, format!("conflict: retry ({m})")),
        };
        eprintln!("mvpsctl: {msg}");
        std::process::exit(code);
    }
}

// ------------------------------------------------------------------------------------ txn

/// Exit status: an error other than the two below (usage, connection, I/O, server error).
const EXIT_ERROR: i32 = 1;
/// Exit status: an --expect range did not match; the transaction was rolled back.
const EXIT_MISMATCH: i32 = 3;
/// Exit status: another writer got in the way (LOCK or COMMIT answered EPERM); nothing was
/// applied and running the same command again may succeed.
const EXIT_CONFLICT: i32 = 4;
/// Largest piece read at once while hashing an --expect range (bounds memory).
const EXPECT_READ_BYTES_MAX: u64 = 8 << 20;

enum Failure {
    Other(String),
    Mismatch(String),
    Conflict(String),
}

/// Run one transaction on an image: BEGIN; if any --expect is given, LOCK and compare the
/// SHA-256 of each expected range; then zero the --zero ranges and apply the --write ranges
/// (zeros first, then writes, each kind in command-line order); COMMIT. All or nothing: the
/// image changes only if every expectation held, and other clients never see a partial
/// result. The token comes from --token or MVPS_TOKEN.
#[derive(FromArgs)]
#[argh(
    subcommand,
    name = "txn",
    example = "mvpsctl txn --server 127.0.0.1:10809 --token \"$T\" \\
    --expect 0:4096:$(dd if=old.img bs=4096 count=1 status=none | sha256sum | cut -c1-64) \\
    --write 0:new-block.bin --fua",
    note = "OFFSET and LEN are bytes, optionally with a binary unit (K, M, G, T). \
            HEXSHA256 is the 64-digit hex digest (as printed by sha256sum) of the LEN \
            bytes at OFFSET. With --expect the image write lock is held from the check \
            to the commit, so the check and the writes form one serializable \
            read-modify-write. Requests longer than the server's maximum payload are \
            split; they stay inside the one transaction.",
    error_code(0, "committed"),
    error_code(1, "error: usage, connection, I/O, or an error reply from the server"),
    error_code(3, "an --expect range did not match; rolled back, nothing applied"),
    error_code(
        4,
        "conflict: another writer committed since BEGIN (or the lock timed out); \
                   rolled back, nothing applied; retry"
    )
)]
struct TxnCmd {
    /// server address: HOST:PORT or unix:/path/to/socket
    #[argh(option)]
    server: String,
    /// export-name token of the image (default: the MVPS_TOKEN environment variable)
    #[argh(option)]
    token: Option<String>,
    /// OFFSET:LEN:HEXSHA256 — the LEN bytes at OFFSET must have this SHA-256 (repeatable)
    #[argh(option)]
    expect: Vec<String>,
    /// OFFSET:FILE — write FILE's contents at OFFSET; FILE "-" is standard input (repeatable)
    #[argh(option)]
    write: Vec<String>,
    /// OFFSET:LEN — zero LEN bytes at OFFSET (repeatable)
    #[argh(option)]
    zero: Vec<String>,
    /// commit with FUA: the transaction is durable (fdatasync'ed) when mvpsctl exits 0
    #[argh(switch)]
    fua: bool,
    /// socket timeout in milliseconds for each request (default 60000)
    #[argh(option, default = "60_000")]
    timeout_ms: u64,
}

struct Expect {
    offset: u64,
    length: u64,
    digest: [u8; sha256::DIGEST_BYTES],
}

fn other(e: impl std::fmt::Display) -> Failure {
    Failure::Other(e.to_string())
}

fn parse_expect(s: &str) -> Result<Expect, String> {
    let bad = || format!("--expect {s:?}: want OFFSET:LEN:HEXSHA256");
    let mut parts = s.splitn(3, ':');
    let (Some(o), Some(l), Some(h)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let offset = auth::parse_size(o).map_err(|e| format!("--expect {s:?}: offset: {e}"))?;
    let length = auth::parse_size(l).map_err(|e| format!("--expect {s:?}: length: {e}"))?;
    let digest = sha256::parse_hex(h).map_err(|e| format!("--expect {s:?}: {e}"))?;
    Ok(Expect {
        offset,
        length,
        digest,
    })
}

fn parse_zero(s: &str) -> Result<(u64, u64), String> {
    let (o, l) = s
        .split_once(':')
        .ok_or_else(|| format!("--zero {s:?}: want OFFSET:LEN"))?;
    let offset = auth::parse_size(o).map_err(|e| format!("--zero {s:?}: offset: {e}"))?;
    let length = auth::parse_size(l).map_err(|e| format!("--zero {s:?}: length: {e}"))?;
    Ok((offset, length))
}

/// Reads every --write source before connecting, so no transaction waits on a slow file
/// or on standard input.
fn load_writes(specs: &[String]) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let mut stdin_used = false;
    let mut out = Vec::with_capacity(specs.len());
    for s in specs {
        let (o, file) = s
            .split_once(':')
            .ok_or_else(|| format!("--write {s:?}: want OFFSET:FILE"))?;
        let offset = auth::parse_size(o).map_err(|e| format!("--write {s:?}: offset: {e}"))?;
        let data = if file == "-" {
            if stdin_used {
                return Err("--write: standard input (-) can be used only once".into());
            }
            stdin_used = true;
            let mut d = Vec::new();
            std::io::stdin()
                .read_to_end(&mut d)
                .map_err(|e| format!("reading standard input: {e}"))?;
            d
        } else {
            std::fs::read(file).map_err(|e| format!("--write {s:?}: {file}: {e}"))?
        };
        out.push((offset, data));
    }
    Ok(out)
}

fn token_from(flag: Option<String>) -> Result<String, String> {
    flag.or_else(|| std::env::var("MVPS_TOKEN").ok())
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().to_string())
        .ok_or_else(|| "no token: pass --token or set MVPS_TOKEN".to_string())
}

/// SHA-256 of `length` bytes at `offset`, read in bounded pieces.
fn range_digest(c: &mut Client, offset: u64, length: u64) -> Result<[u8; 32], client::Error> {
    use sha256::Digest;
    let mut h = sha256::Sha256::new();
    let mut at = 0;
    while at < length {
        let n = EXPECT_READ_BYTES_MAX.min(length - at);
        h.update(&c.read(offset + at, n as usize)?);
        at += n;
    }
    Ok(sha256::finish(h))
}

/// Everything between BEGIN and COMMIT. An `Err` leaves the transaction for the caller to
/// roll back.
fn txn_body(
    c: &mut Client,
    expects: &[Expect],
    zeros: &[(u64, u64)],
    writes: &[(u64, Vec<u8>)],
) -> Result<(), Failure> {
    if !expects.is_empty() {
        c.lock().map_err(|e| match e.is_conflict() {
            true => Failure::Conflict("another writer committed since BEGIN".into()),
            false => other(e),
        })?;
    }
    for x in expects {
        let got = range_digest(c, x.offset, x.length).map_err(other)?;
        if got != x.digest {
            return Err(Failure::Mismatch(format!(
                "--expect failed at offset {} length {}: expected sha256 {}, found {}; \
                 rolled back, nothing written",
                x.offset,
                x.length,
                sha256::to_hex(&x.digest),
                sha256::to_hex(&got)
            )));
        }
    }
    let too_large = |e: client::Error| match e.errno() {
        Some(NBD_ENOSPC) => Failure::Other(format!(
            "{e}: the transaction is larger than the server allows (--txn-bytes-max) or \
             reaches past the end of the image; rolled back"
        )),
        // The transaction lost the image lock to the server's lock timeout.
        _ if e.is_conflict() => Failure::Conflict(format!("{e}; rolled back")),
        _ => other(e),
    };
    for &(offset, length) in zeros {
        c.write_zeroes(offset, length).map_err(too_large)?;
    }
    for (offset, data) in writes {
        c.write(*offset, data).map_err(too_large)?;
    }
    Ok(())
}

fn txn(t: TxnCmd) -> Result<(), Failure> {
    let token = token_from(t.token).map_err(Failure::Other)?;
    let expects: Vec<Expect> = t
        .expect
        .iter()
        .map(|s| parse_expect(s))
        .collect::<Result<_, _>>()
        .map_err(Failure::Other)?;
    let zeros: Vec<(u64, u64)> = t
        .zero
        .iter()
        .map(|s| parse_zero(s))
        .collect::<Result<_, _>>()
        .map_err(Failure::Other)?;
    let writes = load_writes(&t.write).map_err(Failure::Other)?;
    if t.timeout_ms == 0 {
        return Err(Failure::Other("--timeout-ms must be at least 1".into()));
    }
    let mut c =
        Client::connect(&t.server, &token).map_err(|e| other(format!("{}: {e}", t.server)))?;
    c.set_timeout(Some(Duration::from_millis(t.timeout_ms)))
        .map_err(other)?;
    c.begin().map_err(other)?;
    if let Err(f) = txn_body(&mut c, &expects, &zeros, &writes) {
        // Best effort: the server also rolls back when the connection closes.
        let _ = c.rollback();
        let _ = c.disconnect();
        return Err(f);
    }
    let committed = if t.fua { c.commit_fua() } else { c.commit() };
    committed.map_err(|e| match e.is_conflict() {
        true => Failure::Conflict(
            "the transaction lost the image lock to the server's lock \
                                   timeout"
                .into(),
        ),
        false => other(e),
    })?;
    let _ = c.disconnect();
    let written: usize = writes.iter().map(|(_, d)| d.len()).sum();
    let zeroed: u64 = zeros.iter().map(|z| z.1).sum();
    println!(
        "committed: {} expectation(s) held; {} write(s), {written} bytes; {} zero range(s), \
         {zeroed} bytes{}",
        expects.len(),
        writes.len(),
        zeros.len(),
        if t.fua { "; durable (FUA)" } else { "" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        let d = sha256::to_hex(&sha256::digest(b"abc"));
        let x = parse_expect(&format!("4K:512:{d}")).unwrap();
        assert_eq!(
            (x.offset, x.length, x.digest),
            (4096, 512, sha256::digest(b"abc"))
        );
        assert!(parse_expect(&format!("0:{d}")).is_err());
        assert!(parse_expect("0:1:abc").is_err());
        assert_eq!(parse_zero("1M:100").unwrap(), (1 << 20, 100));
        assert!(parse_zero("1M").is_err());
        assert!(load_writes(&["x".to_string()]).is_err());
        assert!(load_writes(&["0:/nonexistent/mvps".to_string()]).is_err());
    }

    #[test]
    fn help_lists_exit_codes() {
        let help = match TxnCmd::from_args(&["txn"], &["--help"]) {
            Err(e) => e.output,
            Ok(_) => panic!("--help parsed"),
        };
        for code in ["0", "1", "3", "4"] {
            assert!(
                help.lines().any(|l| l.trim_start().starts_with(code)),
                "{code}:\n{help}"
            );
        }
    }
}
