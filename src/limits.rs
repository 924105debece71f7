//! Every limit the server enforces, in one place. Each says what it bounds and why.

/// Largest READ or WRITE payload we accept. The NBD spec asks servers to accept at least
/// 2^25 bytes without treating it as a denial of service; we advertise exactly that.
pub const REQUEST_PAYLOAD_BYTES_MAX: u32 = 1 << 25;

/// Largest effect length for TRIM / WRITE_ZEROES in one request. These carry no payload, so a
/// large value costs only index entries (extents), not memory per byte.
pub const REQUEST_EFFECT_BYTES_MAX: u64 = u32::MAX as u64;

/// Option payloads longer than this are refused (the spec's NBD_MAX_STRING is 4096; a JWT
/// export name plus GO framing fits well inside).
pub const OPTION_LENGTH_MAX: u32 = 8192;

/// Longest export name (JWT) we accept.
pub const EXPORT_NAME_LENGTH_MAX: usize = 4096;

/// How many options one handshake may send before we judge it a denial of service.
pub const OPTIONS_COUNT_MAX: u32 = 64;

/// Payload bytes one connection may have in flight (WRITE payloads held plus READ buffers).
pub const CONNECTION_IN_FLIGHT_BYTES_MAX: u64 = 128 << 20;

/// Threads serving one connection at most: the requests it can have executing at once (each
/// worker holds one request from reading it to replying; the socket is not read further
/// while all are busy, which is the client's backpressure). Started as the client's queue
/// depth needs them; each keeps one request buffer of at most 4 MiB between requests.
pub const CONNECTION_WORKER_THREADS: usize = 8;

/// Simultaneous client connections to one server process.
pub const CONNECTIONS_MAX: usize = 1024;

/// Page sizes allowed in tokens: 2^9 ..= 2^16.
pub const PAGE_SIZE_BITS_MIN: u32 = 9;
pub const PAGE_SIZE_BITS_MAX: u32 = 16;

/// Pages written into one layer blob by a single checkpoint. Bigger buffers checkpoint as
/// several layers in one manifest. Bounds temp-file size and per-upload time.
pub const CHECKPOINT_LAYER_PAGES_MAX: u64 = 262_144;

/// A checkpoint starts early once the newest WAL segment holds this many bytes (each
/// checkpoint moves the WAL on to a new segment and deletes the checkpointed ones), so the
/// buffer store's disk use stays bounded even when writes keep overwriting a few pages.
/// Sized to absorb overwrites: uniform random writes over a working set of W bytes leave
/// W × (1 − e^(−this/W)) distinct bytes per checkpoint, so a 1 GiB working set turns 1 GiB
/// of client writes into 0.63 GiB of layer (docs/FORMAT.md, "Compaction").
pub const WAL_SEGMENT_CHECKPOINT_BYTES: u64 = 1 << 30;

/// Page checksums one WAL segment keeps in memory for its checkpoint (`wal::PageCrcs`): 4 MiB
/// of them at most, covering 4 GiB of 4 KiB pages; a bigger segment's later pages are
/// checksummed again by the checkpoint.
pub const PAGE_CRCS_PER_SEGMENT_MAX: usize = 1 << 20;
/// Page slots (segment bytes ÷ page size) that index those checksums, 8 bytes each: 16 MiB
/// at most, covering the first 8 GiB of a segment of 4 KiB pages (1 GiB of 512-byte pages).
pub const PAGE_CRC_SLOTS_PER_SEGMENT_MAX: usize = 2 << 20;

/// Handshake must complete within this long, or the connection is dropped.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 30_000;

const _: () = assert!(PAGE_SIZE_BITS_MAX <= 16 && PAGE_SIZE_BITS_MIN >= 9);
const _: () = assert!((1u32 << PAGE_SIZE_BITS_MAX) <= REQUEST_PAYLOAD_BYTES_MAX);
const _: () = assert!(REQUEST_PAYLOAD_BYTES_MAX as u64 <= CONNECTION_IN_FLIGHT_BYTES_MAX);
