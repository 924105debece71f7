//! The write-ahead log of one image in the buffer store. Format in docs/FORMAT.md §WAL.
//!
//! ```text
//! file header (128 bytes, little-endian)
//!   0 magic "MVPSWAL\0"   8 format_version u32   12 page_size_bits u32
//!  16 writer_id u128      32 image_id_len u32    36 image_id [u8; 84] (zero padded)
//! 120 reserved u32       124 crc32c u32 of bytes 0..124
//! record header (56 bytes) followed by payload_len bytes of payload
//!   0 magic u32 "MVWR"    4 kind u8   5 flags u8   6 reserved u16
//!   8 seq u64            16 txn_id u64           24 change_count u64
//!  32 first_page u64     40 page_count u64       48 payload_len u32
//!  52 crc32c u32 of header bytes 0..52 followed by the payload
//! ```
//!
//! Appends happen under the session's write lock; the file is opened O_APPEND so a record is
//! one `writev`. Nothing is ever overwritten in place: a rewrite makes a new file and renames
//! it over the old one, so readers holding the old file handle keep reading valid bytes.

use super::checksum::{crc32c, Digest};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const WAL_MAGIC: &[u8; 8] = b"MVPSWAL\0";
pub const WAL_FORMAT_VERSION: u32 = 1;
pub const HEADER_SIZE: u64 = 128;
const HEADER_CRC_OFFSET: usize = 124;
const IMAGE_ID_OFFSET: usize = 36;
const IMAGE_ID_CAPACITY: usize = 84;

pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"MVWR");
pub const RECORD_HEADER_SIZE: u64 = 56;
const RECORD_CRC_OFFSET: usize = 52;

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
}

/// Flag: this Data/Zero record is a transaction of its own, committed with `change_count`.
pub const FLAG_SELF_COMMIT: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalHeader {
    pub page_size_bits: u32,
    pub writer_id: u128,
    pub image_id: String,
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

/// A recovered, committed change: pages `[first_page, +page_count)` became the data at
/// `payload_offset` (None: zeros), at `change_count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub first_page: u64,
    pub page_count: u64,
    pub payload_offset: Option<u64>,
    pub change_count: u64,
}

#[derive(Debug, Default)]
pub struct Recovery {
    pub committed: Vec<Committed>,
    pub next_seq: u64,
    pub next_txn_id: u64,
    pub max_change_count: u64,
    /// Bytes cut off the end: a torn or corrupt tail.
    pub truncated_bytes: u64,
    /// Transactions with records but no commit: discarded.
    pub discarded_txns: usize,
}

pub fn encode_header(h: &WalHeader) -> [u8; HEADER_SIZE as usize] {
    let mut b = [0u8; HEADER_SIZE as usize];
    b[0..8].copy_from_slice(WAL_MAGIC);
    b[8..12].copy_from_slice(&WAL_FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&h.page_size_bits.to_le_bytes());
    b[16..32].copy_from_slice(&h.writer_id.to_le_bytes());
    let id = h.image_id.as_bytes();
    assert!(
        id.len() <= IMAGE_ID_CAPACITY,
        "image ids are validated to fit"
    );
    b[32..36].copy_from_slice(&(id.len() as u32).to_le_bytes());
    b[IMAGE_ID_OFFSET..IMAGE_ID_OFFSET + id.len()].copy_from_slice(id);
    let crc = crc32c(&b[..HEADER_CRC_OFFSET]);
    b[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_header(b: &[u8]) -> Result<WalHeader, String> {
    if b.len() < HEADER_SIZE as usize || &b[0..8] != WAL_MAGIC {
        return Err("not an mvps WAL (bad magic)".into());
    }
    let crc = u32::from_le_bytes(b[HEADER_CRC_OFFSET..128].try_into().unwrap());
    if crc != crc32c(&b[..HEADER_CRC_OFFSET]) {
        return Err("WAL header checksum mismatch".into());
    }
    let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
    if version != WAL_FORMAT_VERSION {
        return Err(format!(
            "WAL format version {version}, this build reads {WAL_FORMAT_VERSION}"
        ));
    }
    let id_len = u32::from_le_bytes(b[32..36].try_into().unwrap()) as usize;
    if id_len > IMAGE_ID_CAPACITY {
        return Err("WAL header image id too long".into());
    }
    let image_id = String::from_utf8(b[IMAGE_ID_OFFSET..IMAGE_ID_OFFSET + id_len].to_vec())
        .map_err(|_| "WAL header image id is not UTF-8".to_string())?;
    Ok(WalHeader {
        page_size_bits: u32::from_le_bytes(b[12..16].try_into().unwrap()),
        writer_id: u128::from_le_bytes(b[16..32].try_into().unwrap()),
        image_id,
    })
}

pub fn encode_record(r: &Record, payload: &[u8]) -> [u8; RECORD_HEADER_SIZE as usize] {
    debug_assert_eq!(r.payload_len as usize, payload.len());
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
    let mut d = Digest::new();
    d.update(&b[..RECORD_CRC_OFFSET]);
    d.update(payload);
    b[RECORD_CRC_OFFSET..].copy_from_slice(&d.finalize().to_le_bytes());
    b
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

/// An open WAL file, positioned for appends.
pub struct WalFile {
    pub path: PathBuf,
    pub file: Arc<File>,
    pub header: WalHeader,
    /// Byte offset where the next record goes.
    pub end: u64,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).append(true).open(path)
}

impl WalFile {
    /// Creates a WAL holding only a header, atomically (temp file, fsync, rename, fsync dir).
    pub fn create(path: &Path, header: &WalHeader) -> io::Result<WalFile> {
        write_new_file(path, &encode_header(header), &[])?;
        let file = Arc::new(open_append(path)?);
        Ok(WalFile {
            path: path.to_path_buf(),
            file,
            header: header.clone(),
            end: HEADER_SIZE,
        })
    }

    /// Opens a WAL known to be valid (just written by us) for appends, without replaying it.
    pub fn reopen(path: &Path, header: WalHeader) -> io::Result<WalFile> {
        let file = open_append(path)?;
        let end = file.metadata()?.len();
        Ok(WalFile {
            path: path.to_path_buf(),
            file: Arc::new(file),
            header,
            end,
        })
    }

    /// Opens an existing WAL, replays it and cuts off a torn tail.
    pub fn open(path: &Path) -> io::Result<(WalFile, Recovery)> {
        let file = open_append(path)?;
        let mut hb = [0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut hb, 0)?;
        let header =
            decode_header(&hb).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let size = file.metadata()?.len();
        let (recovery, valid_end) = replay(&file, header.page_size_bits, size)?;
        if valid_end < size {
            file.set_len(valid_end)?;
            file.sync_all()?;
        }
        let file = Arc::new(file);
        Ok((
            WalFile {
                path: path.to_path_buf(),
                file,
                header,
                end: valid_end,
            },
            recovery,
        ))
    }

    /// Appends one record; returns the file offset of its payload.
    pub fn append(&mut self, r: &Record, payload: &[u8]) -> io::Result<u64> {
        let hdr = encode_record(r, payload);
        let mut slices = [IoSlice::new(&hdr), IoSlice::new(payload)];
        let mut bufs: &mut [IoSlice] = &mut slices;
        let total = hdr.len() + payload.len();
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
        Ok(payload_offset)
    }
}

/// Writes `header` and then `body` chunks into a new file that replaces `path` atomically.
pub fn write_new_file(path: &Path, header: &[u8], body: &[&[u8]]) -> io::Result<()> {
    let tmp = path.with_extension("wal.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(header)?;
        for b in body {
            f.write_all(b)?;
        }
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    crate::store::local::fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Pending (uncommitted) records of one transaction during replay.
struct PendingTxn {
    changes: Vec<Committed>,
}

/// Replays records from `HEADER_SIZE`; returns what was committed and where valid data ends.
fn replay(file: &File, page_size_bits: u32, size: u64) -> io::Result<(Recovery, u64)> {
    let mut rec = Recovery {
        next_seq: 1,
        next_txn_id: 1,
        ..Default::default()
    };
    let mut pending: std::collections::HashMap<u64, PendingTxn> = Default::default();
    let mut pos = HEADER_SIZE;
    let mut payload = Vec::new();
    let mut last_seq = 0;
    while pos + RECORD_HEADER_SIZE <= size {
        let mut hb = [0u8; RECORD_HEADER_SIZE as usize];
        file.read_exact_at(&mut hb, pos)?;
        let Some((r, crc)) = decode_record(&hb) else {
            break;
        };
        let end = pos + RECORD_HEADER_SIZE + r.payload_len as u64;
        let expect_len = if r.kind == Kind::Data {
            r.page_count << page_size_bits
        } else {
            0
        };
        if end > size || r.payload_len as u64 != expect_len || r.seq <= last_seq {
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
        last_seq = r.seq;
        apply_record(&r, pos + RECORD_HEADER_SIZE, &mut rec, &mut pending);
        pos = end;
    }
    rec.next_seq = last_seq + 1;
    rec.truncated_bytes = size - pos;
    rec.discarded_txns = pending.len();
    Ok((rec, pos))
}

fn apply_record(
    r: &Record,
    payload_offset: u64,
    rec: &mut Recovery,
    pending: &mut std::collections::HashMap<u64, PendingTxn>,
) {
    rec.next_txn_id = rec.next_txn_id.max(r.txn_id + 1);
    match r.kind {
        Kind::Data | Kind::Zero => {
            let c = Committed {
                first_page: r.first_page,
                page_count: r.page_count,
                payload_offset: (r.kind == Kind::Data).then_some(payload_offset),
                change_count: r.change_count,
            };
            if r.flags & FLAG_SELF_COMMIT != 0 {
                rec.max_change_count = rec.max_change_count.max(r.change_count);
                rec.committed.push(c);
            } else {
                pending
                    .entry(r.txn_id)
                    .or_insert(PendingTxn { changes: vec![] })
                    .changes
                    .push(c);
            }
        }
        Kind::Commit => {
            rec.max_change_count = rec.max_change_count.max(r.change_count);
            if let Some(t) = pending.remove(&r.txn_id) {
                for mut c in t.changes {
                    c.change_count = r.change_count;
                    rec.committed.push(c);
                }
            }
        }
        Kind::Abort => {
            pending.remove(&r.txn_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> WalHeader {
        WalHeader {
            page_size_bits: 9,
            writer_id: 0xabcdef,
            image_id: "w.mvps-image".into(),
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

    #[test]
    fn header_round_trip_and_corruption() {
        let b = encode_header(&hdr());
        assert_eq!(decode_header(&b).unwrap(), hdr());
        let mut bad = b;
        bad[20] ^= 1;
        assert!(decode_header(&bad).unwrap_err().contains("checksum"));
    }

    #[test]
    fn replay_commits_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.wal");
        let mut w = WalFile::create(&p, &hdr()).unwrap();
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
        let commit = Record {
            kind: Kind::Commit,
            payload_len: 0,
            ..data(4, 2, 2, 0, 0, 0)
        };
        w.append(&commit, &[]).unwrap();
        // An uncommitted transaction and a torn record.
        w.append(&data(5, 3, 0, 7, 1, 0), &[3u8; 512]).unwrap();
        let good_end = w.end;
        w.append(&data(6, 4, 3, 1, 1, FLAG_SELF_COMMIT), &[4u8; 512])
            .unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(w.end - 100).unwrap();
        drop(w);

        let (w2, r) = WalFile::open(&p).unwrap();
        assert_eq!(w2.end, good_end);
        assert_eq!(r.committed.len(), 3);
        assert_eq!(r.committed[0].change_count, 1);
        assert_eq!(r.committed[1].first_page, 5);
        assert_eq!(r.committed[1].change_count, 2);
        assert_eq!(r.committed[2].payload_offset, None);
        assert_eq!(r.max_change_count, 2);
        assert_eq!(r.discarded_txns, 1);
        assert_eq!(r.next_seq, 6);
        let mut page = [0u8; 512];
        w2.file
            .read_exact_at(&mut page, r.committed[1].payload_offset.unwrap())
            .unwrap();
        assert_eq!(page, [2u8; 512]);
    }

    #[test]
    fn flipped_payload_bit_ends_replay() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.wal");
        let mut w = WalFile::create(&p, &hdr()).unwrap();
        w.append(&data(1, 1, 1, 0, 1, FLAG_SELF_COMMIT), &[1u8; 512])
            .unwrap();
        let off = w
            .append(&data(2, 2, 2, 1, 1, FLAG_SELF_COMMIT), &[1u8; 512])
            .unwrap();
        drop(w);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[9], off + 100).unwrap();
        let (_, r) = WalFile::open(&p).unwrap();
        assert_eq!(r.committed.len(), 1);
        assert!(r.truncated_bytes > 0);
    }
}
