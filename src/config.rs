//! Command-line configuration of `mvps-te`. Every flag can also be given as an environment
//! variable `MVPS_TE_<FLAG_IN_UPPER_SNAKE_CASE>` (so a systemd `EnvironmentFile` works); a
//! flag on the command line wins over the environment.

use argh::FromArgs;
use std::path::PathBuf;

/// mvps transaction engine: serves block-device images over NBD, buffers writes in a local
/// write-ahead log, and checkpoints them to an image store (a local directory or S3).
///
/// Every flag may also be set through an environment variable MVPS_TE_<FLAG>, e.g.
/// MVPS_TE_LISTEN=unix:/run/mvps.sock. The JWT secret is read from MVPS_TE_JWT_SECRET.
/// S3 credentials come only from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
/// S3_ENDPOINT.
#[derive(FromArgs, Debug, Clone)]
pub struct Config {
    /// address to listen on: HOST:PORT, or unix:/path/to/socket (default 127.0.0.1:10809)
    #[argh(option, default = "String::from(\"127.0.0.1:10809\")")]
    pub listen: String,

    /// directory holding the default local image store and buffer store (default ./mvps-data)
    #[argh(option, default = "PathBuf::from(\"mvps-data\")")]
    pub data_dir: PathBuf,

    /// image store kind: local (default) or s3
    #[argh(option, default = "String::from(\"local\")")]
    pub image_store: String,

    /// directory of the local image store (default <data-dir>/image-store)
    #[argh(option)]
    pub image_store_local_path: Option<PathBuf>,

    /// S3 bucket of the image store (with --image-store s3)
    #[argh(option)]
    pub image_store_s3_bucket: Option<String>,

    /// key prefix inside the S3 bucket, e.g. test/ (with --image-store s3)
    #[argh(option, default = "String::new()")]
    pub image_store_s3_prefix: String,

    /// directory of the buffer store, the local write-ahead logs (default <data-dir>/buffer-store)
    #[argh(option)]
    pub buffer_store_path: Option<PathBuf>,

    /// HS256 secret that export-name tokens are signed with (normally set through
    /// MVPS_TE_JWT_SECRET rather than on the command line, where other users can see it)
    #[argh(option)]
    pub jwt_secret: Option<String>,

    /// milliseconds between checkpoints of the write buffer to the image store (default 60000)
    #[argh(option, default = "60_000")]
    pub checkpoint_interval_ms: u64,

    /// random jitter added to each checkpoint interval, in milliseconds (default 10000)
    #[argh(option, default = "10_000")]
    pub checkpoint_interval_jitter_ms: u64,

    /// bytes of layer data cached in memory for reads from a remote image store
    /// (default 268435456; unused by the local store, which relies on the OS page cache)
    #[argh(option, default = "256 << 20")]
    pub image_cache_size_bytes: u64,

    /// block size of the image cache in bytes: the smallest range fetched from a remote
    /// store, what a random reader fetches (default 4096; sequential readers fetch more)
    #[argh(option, default = "4 << 10")]
    pub image_cache_block_size_bytes: u64,

    /// directory of the image cache's disk tier, below the memory cache: blocks read from a
    /// remote store, checksummed, emptied at every start (default <buffer-store-path>/image-cache)
    #[argh(option)]
    pub image_cache_dir: Option<PathBuf>,

    /// bytes the image cache's disk tier may use; 0 disables it (default 1073741824)
    #[argh(option, default = "1 << 30")]
    pub image_cache_dir_size_bytes: u64,

    /// un-checkpointed pages per image past which writes are slowed down until a checkpoint
    /// catches up; a checkpoint starts at half of it (default 524288)
    #[argh(option, default = "524_288")]
    pub write_throttle_threshold_pages: u64,

    /// largest transaction, in bytes of written data; the write that crosses it fails with
    /// ENOSPC, and the transaction can then only be rolled back (default 1073741824)
    #[argh(option, default = "1 << 30")]
    pub txn_bytes_max: u64,

    /// how long a transaction may hold the image write lock (LOCK_TXN) while other writers
    /// wait, in milliseconds; past it the transaction is rolled back (default 30000)
    #[argh(option, default = "30_000")]
    pub txn_lock_timeout_ms: u64,

    /// serve and buffer writes, but never upload layers or manifests to the image store
    #[argh(switch)]
    pub disable_image_store_write: bool,

    /// at shutdown, how long to keep checkpointing open images so their write-ahead logs are
    /// empty before exiting, in milliseconds; what is left stays in the buffer store (default
    /// 60000)
    #[argh(option, default = "60_000")]
    pub drain_timeout_ms: u64,

    /// log level: error, warn, info (default), debug or trace
    #[argh(option, default = "String::from(\"info\")")]
    pub log_level: String,

    /// print the version and exit
    #[argh(switch)]
    pub version: bool,
}

/// (flag, takes a value). Kept in step with `Config` by the `env_table_matches_flags` test.
pub const FLAGS: &[(&str, bool)] = &[
    ("listen", true),
    ("data-dir", true),
    ("image-store", true),
    ("image-store-local-path", true),
    ("image-store-s3-bucket", true),
    ("image-store-s3-prefix", true),
    ("buffer-store-path", true),
    ("jwt-secret", true),
    ("checkpoint-interval-ms", true),
    ("checkpoint-interval-jitter-ms", true),
    ("image-cache-size-bytes", true),
    ("image-cache-block-size-bytes", true),
    ("image-cache-dir", true),
    ("image-cache-dir-size-bytes", true),
    ("write-throttle-threshold-pages", true),
    ("txn-bytes-max", true),
    ("txn-lock-timeout-ms", true),
    ("disable-image-store-write", false),
    ("drain-timeout-ms", true),
    ("log-level", true),
];

/// Logs to stderr at `level` (error, warn, info, debug or trace), RFC 3339 timestamps.
pub fn init_logging(level: &str) -> Result<(), String> {
    let filter = match level.to_ascii_lowercase().as_str() {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(format!(
                "--log-level {other:?}: use error, warn, info, debug or trace"
            ))
        }
    };
    let cfg = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(log::LevelFilter::Off)
        .set_target_level(log::LevelFilter::Off)
        .build();
    simplelog::WriteLogger::init(filter, cfg, std::io::stderr()).map_err(|e| e.to_string())
}

/// A duration in whole seconds: a number, or with a unit s, m, h or d (`90`, `15m`, `30d`).
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown duration unit in {s:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration {s:?} overflows"))
}

/// Environment variable for a flag: `--image-store-s3-bucket` → `MVPS_TE_IMAGE_STORE_S3_BUCKET`.
pub fn env_name(prefix: &str, flag: &str) -> String {
    format!("{prefix}{}", flag.replace('-', "_").to_ascii_uppercase())
}

/// Appends `--flag value` for each flag set in the environment but absent from `args`.
/// Switches accept 1/true/yes/on (set) and 0/false/no/off/empty (unset).
pub fn merge_env(
    args: &[String],
    prefix: &str,
    flags: &[(&str, bool)],
    get: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, String> {
    let mut out = args.to_vec();
    for (flag, takes_value) in flags {
        let long = format!("--{flag}");
        let given = args
            .iter()
            .any(|a| a == &long || a.starts_with(&format!("{long}=")));
        let var = env_name(prefix, flag);
        let Some(val) = get(&var) else { continue };
        if given {
            continue;
        }
        if *takes_value {
            out.push(long);
            out.push(val);
        } else {
            match val.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => out.push(long),
                "0" | "false" | "no" | "off" | "" => {}
                _ => return Err(format!("{var}={val:?}: expected true or false")),
            }
        }
    }
    Ok(out)
}

/// Parses `argv` (program name first) with the environment merged in, argh style: `--help`
/// prints and exits 0, errors print and exit 2.
pub fn parse_or_exit<T: FromArgs>(prefix: &str, flags: &[(&str, bool)]) -> T {
    let argv: Vec<String> = std::env::args().collect();
    let cmd = argv
        .first()
        .map(|s| s.rsplit('/').next().unwrap_or(s).to_string());
    let cmd = cmd.unwrap_or_else(|| "mvps".into());
    // `--flag=value` is accepted too (argh itself only takes `--flag value`).
    let mut rest = Vec::new();
    for a in &argv[1..] {
        match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => {
                rest.push(f.to_string());
                rest.push(v.to_string());
            }
            _ => rest.push(a.clone()),
        }
    }
    let wants_help = rest.iter().any(|a| a == "--help" || a == "help");
    let merged = if wants_help {
        rest
    } else {
        match merge_env(&rest, prefix, flags, |k| std::env::var(k).ok()) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{cmd}: {e}");
                std::process::exit(2);
            }
        }
    };
    let strs: Vec<&str> = merged.iter().map(|s| s.as_str()).collect();
    match T::from_args(&[&cmd], &strs) {
        Ok(c) => c,
        Err(early) => match early.status {
            Ok(()) => {
                println!("{}", early.output);
                std::process::exit(0);
            }
            Err(()) => {
                eprintln!("{}", early.output.trim_end());
                std::process::exit(2);
            }
        },
    }
}

impl Config {
    pub fn image_store_local_path(&self) -> PathBuf {
        self.image_store_local_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("image-store"))
    }
    pub fn buffer_store_path(&self) -> PathBuf {
        self.buffer_store_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("buffer-store"))
    }
    /// The image cache's disk tier: on the buffer store's disk unless told otherwise.
    pub fn image_cache_dir(&self) -> PathBuf {
        self.image_cache_dir
            .clone()
            .unwrap_or_else(|| self.buffer_store_path().join("image-cache"))
    }
}

/// An image store that already exists, for the tools that read or clean one (`mvpsctl
/// inspect`, `mvps-s3-gc`): no block cache and no start-up probe, as the server has.
pub enum ExistingStore<'a> {
    /// A local image store's root directory (holding `images/` and `blobs/`).
    Local(&'a std::path::Path),
    /// An S3 bucket and key prefix; credentials and `S3_ENDPOINT` come from the environment.
    S3 { bucket: &'a str, prefix: &'a str },
}

/// Opens `at`; a local path that is not a directory is refused rather than created.
pub fn open_existing_store(at: ExistingStore) -> Result<Box<dyn crate::store::ImageStore>, String> {
    match at {
        ExistingStore::Local(p) => {
            if !p.is_dir() {
                return Err(format!(
                    "--image-store-local-path {}: not a directory (the image store's root, \
                     holding images/ and blobs/)",
                    p.display()
                ));
            }
            let s = crate::store::local::LocalStore::open(p)
                .map_err(|e| format!("local image store {}: {e}", p.display()))?;
            Ok(Box::new(s))
        }
        ExistingStore::S3 { bucket, prefix } => {
            let cfg = crate::s3::S3Config::from_env(bucket, prefix)?;
            let s = crate::s3::S3Store::open(cfg).map_err(|e| format!("S3 image store: {e}"))?;
            Ok(Box::new(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_table_matches_flags() {
        let help = match Config::from_args(&["mvps-te"], &["--help"]) {
            Err(e) => e.output,
            Ok(_) => panic!("--help parsed"),
        };
        let in_help: Vec<&str> = help
            .split_whitespace()
            .filter_map(|w| {
                w.strip_prefix("--")
                    .map(|f| f.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
            })
            .filter(|w| !["help", "version"].contains(w))
            .collect();
        let table: Vec<&str> = FLAGS.iter().map(|f| f.0).collect();
        for f in &in_help {
            assert!(table.contains(f), "flag --{f} missing from FLAGS");
        }
        for f in &table {
            assert!(in_help.contains(f), "FLAGS has --{f}, which Config lacks");
        }
    }

    #[test]
    fn env_fills_missing_flags_only() {
        let env = |k: &str| match k {
            "MVPS_TE_LISTEN" => Some("unix:/x".to_string()),
            "MVPS_TE_DATA_DIR" => Some("/d".to_string()),
            "MVPS_TE_DISABLE_IMAGE_STORE_WRITE" => Some("true".to_string()),
            _ => None,
        };
        let args = vec!["--data-dir".to_string(), "/cli".to_string()];
        let m = merge_env(&args, "MVPS_TE_", FLAGS, env).unwrap();
        let strs: Vec<&str> = m.iter().map(|s| s.as_str()).collect();
        let c = Config::from_args(&["mvps-te"], &strs).unwrap();
        assert_eq!(c.listen, "unix:/x");
        assert_eq!(c.data_dir, PathBuf::from("/cli"));
        assert!(c.disable_image_store_write);
        let bad = |k: &str| (k == "MVPS_TE_DISABLE_IMAGE_STORE_WRITE").then(|| "maybe".to_string());
        assert!(merge_env(&[], "MVPS_TE_", FLAGS, bad).is_err());
    }
}
