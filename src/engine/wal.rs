//! The write-ahead log of one image in the buffer store: a sequence of segment files.
//! Format in docs/FORMAT.md §WAL.
//!
//! ```text
//! segment header (128 bytes, little-endian)
//!   0 magic "MVPSWAL\0"   8 format_version u32   12 page_size_bits u32
//!  16 writer_id u128      32 segment u64         40 image_id_len u32
//!  44 image_id [u8; 76] (zero padded)           120 reserved u32      124 crc32c of 0..124
//! record header (56 bytes) followed by payload_len bytes of payload
//!   0 magic u32 "MVWR"    4 kind u8   5 flags u8   6 reserved u16
//!   8 seq u64            16 txn_id u64           24 change_count u64
//!  32 first_page u64     40 page_count u64       48 payload_len u32
//!  52 crc32c u32 of header bytes 0..52 followed by the payload
//! ```
//!
//! Appends go to the newest segment, under the session's write lock; the file is opened
//! O_APPEND so a record is one `writev`. A checkpoint seals the segment (a SEAL record) and
//! moves on to the next one; once everything in an old segment is in the image store, the
//! segment file is deleted whole. Nothing is ever overwritten in place, so a reader holding
//! a segment's file handle keeps reading valid bytes even after the file is deleted.
//!
//! Positions: a byte in the log is named by `segment << SEGMENT_OFFSET_BITS | file offset`
//! (see [`position`]), so one `u64` locates a page across segments.

use super::checksum::{crc32c, Digest, ZeroShift};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const WAL_MAGIC: &[u8; 8] = b"MVPSWAL\0";
pub const WAL_FORMAT_VERSION: u32 = 2;
pub const HEADER_SIZE: u64 = 128;
const HEADER_CRC_OFFSET: usize = 124;
const SEGMENT_OFFSET: usize = 32;
const IMAGE_ID_LEN_OFFSET: usize = 40;
const IMAGE_ID_OFFSET: usize = 44;
const IMAGE_ID_CAPACITY: usize = 76;
// The longest valid image id (64 characters + ".mvps-image") fits.
const _: () = assert!(IMAGE_ID_CAPACITY >= 64 + ".mvps-image".len());

pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"MVWR");
pub const RECORD_HEADER_SIZE: u64 = 56;
const RECORD_CRC_OFFSET: usize = 52;

/// Low bits of a log position that hold the byte offset inside its segment. A segment never
/// grows past 2^36 bytes = 64 GiB (appends beyond that fail: a checkpoint starts a new
/// segment long before, at WAL_SEGMENT_CHECKPOINT_BYTES), so positions never collide; the
/// other 28 bits number segments: 2^28 checkpoints, over 4 years even at two a second.
pub const SEGMENT_OFFSET_BITS: u32 = 36;
pub const SEGMENT_BYTES_MAX: u64 = 1 << SEGMENT_OFFSET_BITS;
/// Segment numbers stay below this, so no position equals the index's "zeros" marker
/// (`u64::MAX`).
pub const SEGMENT_NUMBER_MAX: u64 = (1 << (64 - SEGMENT_OFFSET_BITS)) - 2;

/// The log position of byte `offset` of segment `segment`.
pub fn position(segment: u64, offset: u64) -> u64 {
    debug_assert!(segment <= SEGMENT_NUMBER_MAX && offset < SEGMENT_BYTES_MAX);
    segment << SEGMENT_OFFSET_BITS | offset
}

/// (segment, byte offset in it) of a log position.
pub fn split_position(pos: u64) -> (u64, u64) {
    (pos >> SEGMENT_OFFSET_BITS, pos & (SEGMENT_BYTES_MAX - 1))
}

/// Record kinds. Values are persisted; never reuse a retired one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `page_count` pages of data follow.
    Data = 1,
    /// `page_count` pages become zeros (TRIM, WRITE_ZEROES); no payload.
    Zero = 2,
    /// Transaction `txn_id` commits with `change_count`; no payload.
    Commit = 3,
    /// Transaction `txn_id` is abandoned; no payload.
    Abort = 4,
    /// The last record of a segment: the log goes on in the next segment. No payload.
    Seal = 5,
}

/// Flag: this Data/Zero record is a transaction of its own, committed with `change_count`.
pub const FLAG_SELF_COMMIT: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalHeader {
    pub page_size_bits: u32,
    pub writer_id: u128,
    pub image_id: String,
    pub segment: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub flags: u8,
    pub seq: u64,
    pub txn_id: u64,
    pub change_count: u64,
    pub first_page: u64,
    pub page_count: u64,
    pub payload_len: u32,
}

/// A recovered, committed change: pages `[first_page, +page_count)` became the data at log
/// position `payload_pos` (None: zeros), at `change_count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub first_page: u64,
    pub page_count: u64,
    pub payload_pos: Option<u64>,
    pub change_count: u64,
}

#[derive(Debug, Default)]
pub struct Recovery {
    pub committed: Vec<Committed>,
    pub next_seq: u64,
    pub next_txn_id: u64,
    pub max_change_count: u64,
    /// Bytes cut off: a torn or corrupt tail (including segments after it).
    pub truncated_bytes: u64,
    /// Segment files deleted because they came after a torn segment.
    pub dropped_segments: usize,
    /// Transactions with records but no commit: discarded.
    pub discarded_txns: usize,
    /// The newest segment ends with a SEAL record: appends must go to a new segment.
    pub last_sealed: bool,
}

pub fn encode_header(h: &WalHeader) -> [u8; HEADER_SIZE as usize] {
    let mut b = [0u8; HEADER_SIZE as usize];
    b[0..8].copy_from_slice(WAL_MAGIC);
    b[8..12].copy_from_slice(&WAL_FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&h.page_size_bits.to_le_bytes());
    b[16..32].copy_from_slice(&h.writer_id.to_le_bytes());
    b[SEGMENT_OFFSET..SEGMENT_OFFSET + 8].copy_from_slice(&h.segment.to_le_bytes());
    let id = h.image_id.as_bytes();
    assert!(
        id.len() <= IMAGE_ID_CAPACITY,
        "image ids are validated to fit"
    );
    b[IMAGE_ID_LEN_OFFSET..IMAGE_ID_LEN_OFFSET + 4]
        .copy_from_slice(&(id.len() as u32).to_le_bytes());
    b[IMAGE_ID_OFFSET..IMAGE_ID_OFFSET + id.len()].copy_from_slice(id);
    let crc = crc32c(&b[..HEADER_CRC_OFFSET]);
    b[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_header(b: &[u8]) -> Result<WalHeader, String> {
    if b.len() < HEADER_SIZE as usize || &b[0..8] != WAL_MAGIC {
        return Err("not an mvps WAL segment (bad magic)".into());
    }
    let crc = u32::from_le_bytes(b[HEADER_CRC_OFFSET..128].try_into().unwrap());
    if crc != crc32c(&b[..HEADER_CRC_OFFSET]) {
        return Err("WAL segment header checksum mismatch".into());
    }
    let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
    if version != WAL_FORMAT_VERSION {
        return Err(format!(
            "WAL format version {version}, this build reads {WAL_FORMAT_VERSION}"
        ));
    }
    let at = IMAGE_ID_LEN_OFFSET;
    let id_len = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    if id_len > IMAGE_ID_CAPACITY {
        return Err("WAL segment header image id too long".into());
    }
    let image_id = String::from_utf8(b[IMAGE_ID_OFFSET..IMAGE_ID_OFFSET + id_len].to_vec())
        .map_err(|_| "WAL segment header image id is not UTF-8".to_string())?;
    Ok(WalHeader {
        page_size_bits: u32::from_le_bytes(b[12..16].try_into().unwrap()),
        writer_id: u128::from_le_bytes(b[16..32].try_into().unwrap()),
        segment: u64::from_le_bytes(b[SEGMENT_OFFSET..SEGMENT_OFFSET + 8].try_into().unwrap()),
        image_id,
    })
}

pub fn encode_record(r: &Record, payload: &[u8]) -> [u8; RECORD_HEADER_SIZE as usize] {
    debug_assert_eq!(r.payload_len as usize, payload.len());
    let mut b = record_header(r);
    let mut d = Digest::new();
    d.update(&b[..RECORD_CRC_OFFSET]);
    d.update(payload);
    b[RECORD_CRC_OFFSET..].copy_from_slice(&d.finalize().to_le_bytes());
    b
}

/// As [`encode_record`] for a payload of whole pages of `1 << bits` bytes whose checksums
/// are `page_crcs`: the record's checksum is the same, combined from the pages' instead of
/// computed over the payload again.
fn encode_record_of_pages(
    r: &Record,
    page_crcs: &[u32],
    bits: u32,
) -> [u8; RECORD_HEADER_SIZE as usize] {
    debug_assert_eq!(r.payload_len as usize, page_crcs.len() << bits);
    let mut b = record_header(r);
    let shift = ZeroShift::page(bits);
    let crc = page_crcs
        .iter()
        .fold(crc32c(&b[..RECORD_CRC_OFFSET]), |crc, &page| {
            shift.combine(crc, page)
        });
    b[RECORD_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A record header without its checksum.
fn record_header(r: &Record) -> [u8; RECORD_HEADER_SIZE as usize] {
    let mut b = [0u8; RECORD_HEADER_SIZE as usize];
    b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    b[4] = r.kind as u8;
    b[5] = r.flags;
    b[8..16].copy_from_slice(&r.seq.to_le_bytes());
    b[16..24].copy_from_slice(&r.txn_id.to_le_bytes());
    b[24..32].copy_from_slice(&r.change_count.to_le_bytes());
    b[32..40].copy_from_slice(&r.first_page.to_le_bytes());
    b[40..48].copy_from_slice(&r.page_count.to_le_bytes());
    b[48..52].copy_from_slice(&r.payload_len.to_le_bytes());
    b
}

/// The CRC-32C of each page appended to one segment, in memory, so that the checkpoint
/// writing those pages into a layer (whose index holds a checksum per page) need not
/// compute them again: the append computes them anyway, for the record's checksum. Only
/// for this run of the server (recovered segments have none) and at most
/// `PAGE_CRCS_PER_SEGMENT_MAX` pages; a page without one is checksummed by the checkpoint.
#[derive(Debug, Default)]
pub struct PageCrcs {
    /// By page slot of the segment (byte offset >> page size bits), the page that starts in
    /// it: `(index of its checksum + 1) << 16 | its offset's low bits`, 0 for none. A slot
    /// holds one page at most (pages in the WAL do not overlap). A checkpoint looks pages
    /// up in page order, which is random in the WAL: a direct index costs one cache miss
    /// where a binary search over the records cost ~6 % of the server's CPU in a sustained
    /// random-write job (docs/PERFORMANCE.md).
    slots: Vec<u64>,
    crcs: Vec<u32>,
}

impl PageCrcs {
    /// Records the checksums `crcs[first..]` of the pages at byte `offset` on.
    fn note(&mut self, offset: u64, first: usize, bits: u32) {
        let phase = offset & ((1 << bits) - 1);
        let slot = (offset >> bits) as usize;
        let pages = self.crcs.len() - first;
        if self.slots.len() < slot + pages {
            self.slots.resize(slot + pages, 0);
        }
        for (k, s) in self.slots[slot..slot + pages].iter_mut().enumerate() {
            *s = ((first + k + 1) as u64) << 16 | phase;
        }
    }

    /// The checksums of the `pages` pages at byte `offset` of the segment (pages of
    /// `1 << bits` bytes, all in one record), if recorded.
    pub fn lookup(&self, offset: u64, pages: u64, bits: u32) -> Option<&[u32]> {
        let phase = offset & ((1 << bits) - 1);
        let first_slot = usize::try_from(offset >> bits).ok()?;
        let last_slot = first_slot.checked_add(usize::try_from(pages.checked_sub(1)?).ok()?)?;
        let entry = |slot: usize| {
            let e = *self.slots.get(slot)?;
            (e != 0 && e & 0xffff == phase).then(|| (e >> 16) as usize - 1)
        };
        let (first, last) = (entry(first_slot)?, entry(last_slot)?);
        // The pages between are one record's only if their checksums are consecutive.
        (last.checked_sub(first)? == last_slot - first_slot).then(|| &self.crcs[first..=last])
    }

    pub fn len(&self) -> usize {
        self.crcs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.crcs.is_empty()
    }
}

/// Decodes a record header; the CRC is checked later, together with the payload.
pub fn decode_record(b: &[u8; RECORD_HEADER_SIZE as usize]) -> Option<(Record, u32)> {
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    if u32::from_le_bytes(b[0..4].try_into().unwrap()) != RECORD_MAGIC {
        return None;
    }
    let kind = match b[4] {
        1 => Kind::Data,
        2 => Kind::Zero,
        3 => Kind::Commit,
        4 => Kind::Abort,
        5 => Kind::Seal,
        _ => return None,
    };
    let r = Record {
        kind,
        flags: b[5],
        seq: u64_at(8),
        txn_id: u64_at(16),
        change_count: u64_at(24),
        first_page: u64_at(32),
        page_count: u64_at(40),
        payload_len: u32::from_le_bytes(b[48..52].try_into().unwrap()),
    };
    Some((r, u32::from_le_bytes(b[52..56].try_into().unwrap())))
}

/// The file of segment `segment` of `image_id` in buffer store directory `dir`.
pub fn segment_path(dir: &Path, image_id: &str, segment: u64) -> PathBuf {
    dir.join(format!("{image_id}.{segment:016x}.wal"))
}

/// The names in `dir` that start with `<image_id>.`, without that prefix.
fn image_files(dir: &Path, image_id: &str) -> io::Result<Vec<(String, PathBuf)>> {
    let prefix = format!("{image_id}.");
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if let Some(rest) = e.file_name().to_str().and_then(|n| n.strip_prefix(&prefix)) {
            out.push((rest.to_string(), e.path()));
        }
    }
    Ok(out)
}

/// The segments of `image_id` in `dir`, oldest first.
pub fn list_segments(dir: &Path, image_id: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out: Vec<(u64, PathBuf)> = image_files(dir, image_id)?
        .into_iter()
        .filter_map(|(rest, path)| {
            let hex = rest.strip_suffix(".wal").filter(|h| h.len() == 16)?;
            Some((u64::from_str_radix(hex, 16).ok()?, path))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Deletes `<image_id>.*.wal.tmp`: segments whose creation a crash interrupted.
pub fn remove_stale_temps(dir: &Path, image_id: &str) -> io::Result<()> {
    for (rest, path) in image_files(dir, image_id)? {
        if rest.ends_with(".wal.tmp") {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// The open, newest segment of a WAL, positioned for appends.
pub struct WalFile {
    pub path: PathBuf,
    pub file: Arc<File>,
    pub header: WalHeader,
    /// Byte offset where the next record goes.
    pub end: u64,
    /// Checksums of the pages appended by this process.
    pub page_crcs: PageCrcs,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).append(true).open(path)
}

impl WalFile {
    /// Creates a segment holding only a header, atomically (temp file, fsync, rename, fsync
    /// dir): once this returns, a later `fdatasync` of appended records makes them durable.
    pub fn create(path: &Path, header: &WalHeader) -> io::Result<WalFile> {
        write_new_file(path, &encode_header(header))?;
        let file = Arc::new(open_append(path)?);
        Ok(WalFile {
            path: path.to_path_buf(),
            file,
            header: header.clone(),
            end: HEADER_SIZE,
            page_crcs: PageCrcs::default(),
        })
    }

    pub fn segment(&self) -> u64 {
        self.header.segment
    }

    /// The log position of byte `offset` of this segment.
    pub fn position(&self, offset: u64) -> u64 {
        position(self.header.segment, offset)
    }

    /// Appends one record; returns the log position of its payload.
    pub fn append(&mut self, r: &Record, payload: &[u8]) -> io::Result<u64> {
        let bits = self.header.page_size_bits;
        let pages = payload.len() >> bits;
        let payload_at = self.end + RECORD_HEADER_SIZE;
        let by_page = r.kind == Kind::Data
            && pages > 0
            && payload.len() == pages << bits
            && self.page_crcs.len() + pages <= crate::limits::PAGE_CRCS_PER_SEGMENT_MAX
            && (payload_at >> bits) as usize + pages
                <= crate::limits::PAGE_CRC_SLOTS_PER_SEGMENT_MAX;
        let known = self.page_crcs.crcs.len();
        let hdr = if by_page {
            let crcs = &mut self.page_crcs.crcs;
            crcs.extend(payload.chunks_exact(1 << bits).map(crc32c));
            encode_record_of_pages(r, &crcs[known..], bits)
        } else {
            encode_record(r, payload)
        };
        let at = self.append_encoded(&hdr, payload);
        match &at {
            Ok(pos) if by_page => self.page_crcs.note(split_position(*pos).1, known, bits),
            _ => self.page_crcs.crcs.truncate(known),
        }
        at
    }

    fn append_encoded(
        &mut self,
        hdr: &[u8; RECORD_HEADER_SIZE as usize],
        payload: &[u8],
    ) -> io::Result<u64> {
        let mut slices = [IoSlice::new(hdr), IoSlice::new(payload)];
        let mut bufs: &mut [IoSlice] = &mut slices;
        let total = hdr.len() + payload.len();
        if self.end + total as u64 > SEGMENT_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "WAL segment {} is full ({SEGMENT_BYTES_MAX} bytes): checkpoints are not \
                     draining the buffer",
                    self.path.display()
                ),
            ));
        }
        let mut written = 0;
        while written < total {
            let n = (&*self.file).write_vectored(bufs);
            let n = match n {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "WAL append wrote 0",
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A partial record would be a torn tail; cut it so later appends stay valid.
                    let _ = self.file.set_len(self.end);
                    return Err(e);
                }
            };
            written += n;
            IoSlice::advance_slices(&mut bufs, n);
        }
        let payload_offset = self.end + RECORD_HEADER_SIZE;
        self.end += total as u64;
        Ok(self.position(payload_offset))
    }
}

/// Writes `bytes` into a new file that replaces `path` atomically (temp file, fsync, rename,
/// fsync the directory).
fn write_new_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("wal.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    crate::store::local::fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("WAL segment {}: {why}", path.display()),
    )
}

/// Open segment files by number, oldest first.
pub type SegmentFiles = Vec<(u64, Arc<File>)>;

/// Opens the segments `segments` (oldest first, as [`list_segments`] gives them), replays
/// them as one log and repairs its end: a torn or corrupt record is cut off, and so is every
/// segment after it (a segment that does not end with a SEAL was torn, and nothing written
/// after a torn record was ever flushed). Returns the newest remaining segment, opened for
/// appends, the handles of all remaining segments, and what was committed.
pub fn recover(segments: &[(u64, PathBuf)]) -> io::Result<(WalFile, SegmentFiles, Recovery)> {
    assert!(!segments.is_empty(), "recover needs a segment");
    let mut st = ReplayState {
        rec: Recovery {
            next_seq: 1,
            next_txn_id: 1,
            ..Default::default()
        },
        pending: Default::default(),
        last_seq: 0,
    };
    // Check every header before changing anything: a foreign segment is refused untouched.
    let mut checked: Vec<(File, WalHeader)> = Vec::with_capacity(segments.len());
    for (n, path) in segments {
        let file = open_append(path)?;
        let mut hb = [0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut hb, 0)
            .map_err(|e| invalid(path, format!("header: {e}")))?;
        let header = decode_header(&hb).map_err(|e| invalid(path, e))?;
        if header.segment != *n {
            return Err(invalid(
                path,
                format!("header names segment {}", header.segment),
            ));
        }
        if let Some((_, h0)) = checked.first() {
            if (h0.writer_id, h0.page_size_bits, &h0.image_id)
                != (header.writer_id, header.page_size_bits, &header.image_id)
            {
                return Err(invalid(
                    path,
                    "writer, image or page size differs from the older segments",
                ));
            }
        }
        checked.push((file, header));
    }
    let mut opened: SegmentFiles = Vec::new();
    let mut last: Option<WalFile> = None;
    for (i, ((n, path), (file, header))) in segments.iter().zip(checked).enumerate() {
        let size = file.metadata()?.len();
        let (valid_end, sealed) = replay_segment(&file, &header, size, &mut st)?;
        let is_last = i + 1 == segments.len();
        // A segment not ending in a SEAL was cut short, unless it is the newest.
        let torn = !sealed && (valid_end < size || !is_last);
        if valid_end < size {
            file.set_len(valid_end)?;
            file.sync_all()?;
            st.rec.truncated_bytes += size - valid_end;
        }
        let file = Arc::new(file);
        opened.push((*n, file.clone()));
        st.rec.last_sealed = sealed;
        last = Some(WalFile {
            path: path.clone(),
            file,
            header,
            end: valid_end,
            page_crcs: PageCrcs::default(),
        });
        if torn && !is_last {
            // Everything after the cut goes: it was never flushed (see above).
            for (_, later) in &segments[i + 1..] {
                st.rec.truncated_bytes += std::fs::metadata(later).map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(later)?;
                st.rec.dropped_segments += 1;
            }
            if let Some(dir) = path.parent() {
                crate::store::local::fsync_dir(dir)?;
            }
            break;
        }
    }
    let mut rec = st.rec;
    rec.next_seq = st.last_seq + 1;
    rec.discarded_txns = st.pending.len();
    Ok((last.expect("at least one segment"), opened, rec))
}

/// Pending (uncommitted) records of one transaction during replay.
struct PendingTxn {
    changes: Vec<Committed>,
}

struct ReplayState {
    rec: Recovery,
    pending: std::collections::HashMap<u64, PendingTxn>,
    last_seq: u64,
}

/// Replays the records of one segment; returns where its valid records end, and whether the
/// last of them is a SEAL.
fn replay_segment(
    file: &File,
    header: &WalHeader,
    size: u64,
    st: &mut ReplayState,
) -> io::Result<(u64, bool)> {
    let mut pos = HEADER_SIZE;
    let mut payload = Vec::new();
    while pos + RECORD_HEADER_SIZE <= size {
        let mut hb = [0u8; RECORD_HEADER_SIZE as usize];
        file.read_exact_at(&mut hb, pos)?;
        let Some((r, crc)) = decode_record(&hb) else {
            break;
        };
        let end = pos + RECORD_HEADER_SIZE + r.payload_len as u64;
        let expect_len = if r.kind == Kind::Data {
            r.page_count << header.page_size_bits
        } else {
            0
        };
        if end > size || r.payload_len as u64 != expect_len || r.seq <= st.last_seq {
            break;
        }
        payload.resize(r.payload_len as usize, 0);
        file.read_exact_at(&mut payload, pos + RECORD_HEADER_SIZE)?;
        let mut d = Digest::new();
        d.update(&hb[..RECORD_CRC_OFFSET]);
        d.update(&payload);
        if d.finalize() != crc {
            break;
        }
        st.last_seq = r.seq;
        pos = end;
        if r.kind == Kind::Seal {
            return Ok((pos, true));
        }
        let payload_pos = position(header.segment, end - r.payload_len as u64);
        apply_record(&r, payload_pos, st);
    }
    Ok((pos, false))
}

fn apply_record(r: &Record, payload_pos: u64, st: &mut ReplayState) {
    let rec = &mut st.rec;
    rec.next_txn_id = rec.next_txn_id.max(r.txn_id + 1);
    match r.kind {
        Kind::Data | Kind::Zero => {
            let c = Committed {
                first_page: r.first_page,
                page_count: r.page_count,
                payload_pos: (r.kind == Kind::Data).then_some(payload_pos),
                change_count: r.change_count,
            };
            if r.flags & FLAG_SELF_COMMIT != 0 {
                rec.max_change_count = rec.max_change_count.max(r.change_count);
                rec.committed.push(c);
            } else {
                st.pending
                    .entry(r.txn_id)
                    .or_insert(PendingTxn { changes: vec![] })
                    .changes
                    .push(c);
            }
        }
        Kind::Commit => {
            rec.max_change_count = rec.max_change_count.max(r.change_count);
            if let Some(t) = st.pending.remove(&r.txn_id) {
                for mut c in t.changes {
                    c.change_count = r.change_count;
                    rec.committed.push(c);
                }
            }
        }
        Kind::Abort => {
            st.pending.remove(&r.txn_id);
        }
        Kind::Seal => unreachable!("replay_segment stops at a seal"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(segment: u64) -> WalHeader {
        WalHeader {
            page_size_bits: 9,
            writer_id: 0xabcdef,
            image_id: "w.mvps-image".into(),
            segment,
        }
    }

    fn data(seq: u64, txn: u64, cc: u64, page: u64, n: u64, flags: u8) -> Record {
        Record {
            kind: Kind::Data,
            flags,
            seq,
            txn_id: txn,
            change_count: cc,
            first_page: page,
            page_count: n,
            payload_len: (n << 9) as u32,
        }
    }

    fn end_record(kind: Kind, seq: u64, txn: u64, cc: u64) -> Record {
        Record {
            kind,
            payload_len: 0,
            ..data(seq, txn, cc, 0, 0, 0)
        }
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let b = encode_header(&hdr(7));
        assert_eq!(decode_header(&b).unwrap(), hdr(7));
        let mut bad = b;
        bad[20] ^= 1;
        assert!(decode_header(&bad).unwrap_err().contains("checksum"));
        let long = WalHeader {
            image_id: format!("{}.mvps-image", "x".repeat(64)),
            ..hdr(1)
        };
        assert_eq!(decode_header(&encode_header(&long)).unwrap(), long);
    }

    #[test]
    fn positions_name_segment_and_offset() {
        let p = position(3, 4096);
        assert_eq!(split_position(p), (3, 4096));
        assert!(position(SEGMENT_NUMBER_MAX, SEGMENT_BYTES_MAX - 1) < u64::MAX);
    }

    /// Appended pages keep their checksums: looked up by any run of pages inside one record,
    /// equal to the pages' own; runs across records or off the page grid have none. The
    /// records they were combined into replay as valid (the checksum is the whole one).
    #[test]
    fn appended_pages_keep_their_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let p = segment_path(dir.path(), "w.mvps-image", 1);
        let mut w = WalFile::create(&p, &hdr(1)).unwrap();
        let payload: Vec<u8> = (0..3 * 512u32).map(|i| (i * 31 + 7) as u8).collect();
        let a = w
            .append(&data(1, 1, 1, 0, 3, FLAG_SELF_COMMIT), &payload)
            .unwrap();
        let zero = Record {
            kind: Kind::Zero,
            payload_len: 0,
            ..data(2, 2, 2, 9, 4, FLAG_SELF_COMMIT)
        };
        w.append(&zero, &[]).unwrap();
        let b = w
            .append(&data(3, 3, 3, 5, 1, FLAG_SELF_COMMIT), &[9u8; 512])
            .unwrap();
        let (a, b) = (split_position(a).1, split_position(b).1);
        let want: Vec<u32> = payload.chunks(512).map(crc32c).collect();
        let c = &w.page_crcs;
        assert_eq!(c.len(), 4);
        assert_eq!(c.lookup(a, 3, 9), Some(&want[..]));
        assert_eq!(c.lookup(a + 512, 2, 9), Some(&want[1..]));
        assert_eq!(c.lookup(b, 1, 9), Some(&[crc32c(&[9u8; 512])][..]));
        assert_eq!(c.lookup(a + 512, 3, 9), None, "past the record's end");
        assert_eq!(c.lookup(a + 100, 1, 9), None, "off the page grid");
        assert_eq!(c.lookup(a - 56, 1, 9), None, "before any record");
        drop(w);
        let (_, _, r) = recover(&[(1, p)]).unwrap();
        assert_eq!(r.committed.len(), 3, "every record's checksum holds");
    }

    #[test]
    fn replay_commits_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = segment_path(dir.path(), "w.mvps-image", 1);
        let mut w = WalFile::create(&p, &hdr(1)).unwrap();
        w.append(&data(1, 1, 1, 0, 2, FLAG_SELF_COMMIT), &[1u8; 1024])
            .unwrap();
        // A transaction: two data records, then commit.
        w.append(&data(2, 2, 0, 5, 1, 0), &[2u8; 512]).unwrap();
        let zero = Record {
            kind: Kind::Zero,
            payload_len: 0,
            ..data(3, 2, 0, 9, 4, 0)
        };
        w.append(&zero, &[]).unwrap();
        w.append(&end_record(Kind::Commit, 4, 2, 2), &[]).unwrap();
        // An uncommitted transaction and a torn record.
        w.append(&data(5, 3, 0, 7, 1, 0), &[3u8; 512]).unwrap();
        let good_end = w.end;
        w.append(&data(6, 4, 3, 1, 1, FLAG_SELF_COMMIT), &[4u8; 512])
            .unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(w.end - 100).unwrap();
        drop(w);

        let segs = list_segments(dir.path(), "w.mvps-image").unwrap();
        assert_eq!(segs, vec![(1, p.clone())]);
        let (w2, files, r) = recover(&segs).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(w2.end, good_end);
        assert!(!r.last_sealed);
        assert_eq!(r.committed.len(), 3);
        assert_eq!(r.committed[0].change_count, 1);
        assert_eq!(r.committed[1].first_page, 5);
        assert_eq!(r.committed[1].change_count, 2);
        assert_eq!(r.committed[2].payload_pos, None);
        assert_eq!(r.max_change_count, 2);
        assert_eq!(r.discarded_txns, 1);
        assert_eq!(r.next_seq, 6);
        let mut page = [0u8; 512];
        let (seg, off) = split_position(r.committed[1].payload_pos.unwrap());
        assert_eq!(seg, 1);
        w2.file.read_exact_at(&mut page, off).unwrap();
        assert_eq!(page, [2u8; 512]);
    }

    #[test]
    fn flipped_payload_bit_ends_replay() {
        let dir = tempfile::tempdir().unwrap();
        let p = segment_path(dir.path(), "w.mvps-image", 1);
        let mut w = WalFile::create(&p, &hdr(1)).unwrap();
        w.append(&data(1, 1, 1, 0, 1, FLAG_SELF_COMMIT), &[1u8; 512])
            .unwrap();
        let pos = w
            .append(&data(2, 2, 2, 1, 1, FLAG_SELF_COMMIT), &[1u8; 512])
            .unwrap();
        drop(w);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[9], split_position(pos).1 + 100).unwrap();
        let (_, _, r) = recover(&[(1, p)]).unwrap();
        assert_eq!(r.committed.len(), 1);
        assert!(r.truncated_bytes > 0);
    }

    /// A transaction whose records span a seal commits from the next segment; a segment cut
    /// short before its seal drops every later segment (nothing there was ever flushed).
    #[test]
    fn segments_replay_as_one_log_and_a_torn_one_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let id = "w.mvps-image";
        let mut a = WalFile::create(&segment_path(dir.path(), id, 4), &hdr(4)).unwrap();
        a.append(&data(1, 1, 1, 0, 1, FLAG_SELF_COMMIT), &[1u8; 512])
            .unwrap();
        a.append(&data(2, 2, 0, 3, 1, 0), &[2u8; 512]).unwrap();
        a.append(&end_record(Kind::Seal, 3, 0, 0), &[]).unwrap();
        let mut b = WalFile::create(&segment_path(dir.path(), id, 5), &hdr(5)).unwrap();
        b.append(&end_record(Kind::Commit, 4, 2, 2), &[]).unwrap();
        let b_sealed_at = b.end;
        b.append(&end_record(Kind::Seal, 5, 0, 0), &[]).unwrap();
        let mut c = WalFile::create(&segment_path(dir.path(), id, 6), &hdr(6)).unwrap();
        c.append(&data(6, 3, 3, 8, 1, FLAG_SELF_COMMIT), &[3u8; 512])
            .unwrap();

        let segs = list_segments(dir.path(), id).unwrap();
        assert_eq!(segs.iter().map(|s| s.0).collect::<Vec<_>>(), vec![4, 5, 6]);
        let (last, files, r) = recover(&segs).unwrap();
        assert_eq!(last.segment(), 6);
        assert_eq!(files.len(), 3);
        assert_eq!(r.committed.len(), 3);
        assert_eq!(r.committed[1].first_page, 3);
        assert_eq!(split_position(r.committed[1].payload_pos.unwrap()).0, 4);
        assert_eq!(r.committed[1].change_count, 2);
        assert_eq!(r.next_seq, 7);
        assert_eq!(r.dropped_segments, 0);

        // Cut segment 5's seal: segment 6 goes, and the log ends after the commit.
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), id, 5))
            .unwrap();
        f.set_len(b_sealed_at + 10).unwrap();
        let (last, files, r) = recover(&list_segments(dir.path(), id).unwrap()).unwrap();
        assert_eq!(last.segment(), 5);
        assert_eq!(last.end, b_sealed_at);
        assert_eq!(files.len(), 2);
        assert_eq!(r.dropped_segments, 1);
        assert_eq!(r.committed.len(), 2);
        assert!(!segment_path(dir.path(), id, 6).exists());
    }

    #[test]
    fn a_segment_from_another_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let id = "w.mvps-image";
        let mut a = WalFile::create(&segment_path(dir.path(), id, 1), &hdr(1)).unwrap();
        a.append(&end_record(Kind::Seal, 1, 0, 0), &[]).unwrap();
        let other = WalHeader {
            writer_id: 1,
            ..hdr(2)
        };
        WalFile::create(&segment_path(dir.path(), id, 2), &other).unwrap();
        let e = recover(&list_segments(dir.path(), id).unwrap())
            .err()
            .unwrap();
        assert!(e.to_string().contains("differs"), "{e}");
        // Even when the older segment is torn, nothing is deleted before the check.
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), id, 1))
            .unwrap();
        f.set_len(HEADER_SIZE + 3).unwrap();
        assert!(recover(&list_segments(dir.path(), id).unwrap()).is_err());
        assert!(segment_path(dir.path(), id, 2).exists());
    }
}
