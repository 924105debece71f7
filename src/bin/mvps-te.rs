//! mvps-te: the transaction engine (the NBD server).

use mvps::config::{self, Config};
use mvps::engine::{BufferStore, SessionConfig};
use mvps::s3::{S3Config, S3Store};
use mvps::server::{self, exports::EngineExports, Listener};
use mvps::store::{cache::BlockCache, disk_cache::DiskCache, local::LocalStore, ImageStore};
use std::sync::Arc;

/// The image store, and the S3 store again when it is one (for its read counters).
type Stores = (Arc<dyn ImageStore>, Option<Arc<S3Store>>);

fn open_image_store(c: &Config) -> Result<Stores, String> {
    match c.image_store.as_str() {
        "local" => {
            let path = c.image_store_local_path();
            let s = LocalStore::open(&path)
                .map_err(|e| format!("local image store {}: {e}", path.display()))?;
            Ok((Arc::new(s), None))
        }
        "s3" => {
            let bucket = c
                .image_store_s3_bucket
                .as_deref()
                .filter(|b| !b.is_empty())
                .ok_or("--image-store s3 needs --image-store-s3-bucket")?;
            let cfg = S3Config::from_env(bucket, &c.image_store_s3_prefix)?;
            let s = S3Store::open_checked(cfg).map_err(|e| format!("S3 image store: {e}"))?;
            // After the check: a store that does not work is the one line of a failed start.
            let cache = open_image_cache(c)?;
            let s = Arc::new(s.with_block_cache(Arc::new(cache)));
            log_read_stats(&s);
            Ok((s.clone(), Some(s)))
        }
        other => Err(format!("--image-store {other:?}: use local or s3")),
    }
}

/// The block cache for a remote image store: memory, and the disk tier below it unless its
/// size or the memory cache's is 0.
fn open_image_cache(c: &Config) -> Result<BlockCache, String> {
    let cache = BlockCache::new(c.image_cache_size_bytes, c.image_cache_block_size_bytes)?;
    log::info!(
        "image cache: {} bytes in blocks of {} bytes",
        c.image_cache_size_bytes,
        c.image_cache_block_size_bytes
    );
    if c.image_cache_dir_size_bytes == 0 || c.image_cache_size_bytes == 0 {
        return Ok(cache);
    }
    let dir = c.image_cache_dir();
    let disk = DiskCache::open(
        &dir,
        c.image_cache_dir_size_bytes,
        c.image_cache_block_size_bytes,
    )?;
    log::info!(
        "image cache disk tier: {} bytes in {}",
        disk.size_bytes(),
        dir.display()
    );
    cache.with_disk(disk)
}

/// How often the S3 read counters are logged (only when they changed).
const READ_STATS_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Logs the S3 store's read counters (cache hits, bytes fetched and read, refetches, new
/// connections) every [`READ_STATS_LOG_INTERVAL`] while they change: the figures the S3
/// benchmark reports, and what to look at when reads are slow.
fn log_read_stats(s: &Arc<S3Store>) {
    let s = Arc::downgrade(s);
    let spawned = std::thread::Builder::new()
        .name("read-stats".into())
        .spawn(move || {
            let mut last = String::new();
            loop {
                std::thread::sleep(READ_STATS_LOG_INTERVAL);
                let Some(s) = s.upgrade() else { return };
                let line = s.stats_line();
                if line != last {
                    log::info!("{line}");
                    last = line;
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("read counters will not be logged: {e}");
    }
}

fn run(c: Config) -> Result<(), String> {
    config::init_logging(&c.log_level)?;
    let secret = c
        .jwt_secret
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or("no JWT secret: set MVPS_TE_JWT_SECRET (or --jwt-secret)")?;
    if c.checkpoint_interval_ms == 0 {
        return Err("--checkpoint-interval-ms must be at least 1".into());
    }
    // Bind first: a port in use fails before anything is created on disk.
    let listener = Listener::bind(&c.listen)?;
    let (store, s3) = open_image_store(&c)?;
    let session_cfg = SessionConfig {
        checkpoint_interval_ms: c.checkpoint_interval_ms,
        checkpoint_interval_jitter_ms: c.checkpoint_interval_jitter_ms,
        write_throttle_threshold_pages: c.write_throttle_threshold_pages,
        disable_image_store_write: c.disable_image_store_write,
        wal_segment_checkpoint_bytes: mvps::limits::WAL_SEGMENT_CHECKPOINT_BYTES,
        txn_bytes_max: c.txn_bytes_max,
        txn_lock_timeout_ms: c.txn_lock_timeout_ms,
        policy: mvps::engine::debt::Policy::DEFAULT,
    };
    let buffer_path = c.buffer_store_path();
    let buffer = Arc::new(BufferStore::open(&buffer_path, store.clone(), session_cfg)?);
    log::info!(
        "mvps-te {} listening on {}; image store {}; buffer store {}",
        env!("CARGO_PKG_VERSION"),
        listener.describe(),
        store.describe(),
        buffer_path.display()
    );
    let exports = Arc::new(EngineExports::new(buffer.clone(), secret.into_bytes()));
    server::serve(listener, exports);
    buffer.drain(std::time::Duration::from_millis(c.drain_timeout_ms));
    buffer.shutdown();
    if let Some(s3) = s3 {
        log::info!("{}", s3.stats_line());
    }
    log::info!("stopped cleanly");
    Ok(())
}

fn main() {
    mvps::fail_stop::install_panic_hook();
    mvps::memory::limit_arenas();
    let c: Config = config::parse_or_exit("MVPS_TE_", config::FLAGS);
    if c.version {
        println!("mvps-te {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if let Err(e) = run(c) {
        eprintln!("mvps-te: error: {e}");
        std::process::exit(1);
    }
}
