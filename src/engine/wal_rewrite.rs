//! WAL rewrite: after a checkpoint, when dead bytes dominate, the WAL is replaced by a file
//! holding only the live records (docs/FORMAT.md §Rewrite).
//!
//! Writers are not stopped while live data is copied:
//! 1. under the writer lock (briefly): note the live extents, the WAL end `E0`, and reserve
//!    sequence numbers for the copies;
//! 2. unlocked: write the copies into `<image>.wal.tmp`;
//! 3. under the writer lock: append the bytes the WAL gained since `E0` verbatim (whole
//!    records, already checksummed), fsync, rename over the WAL, fsync the directory, and
//!    remap every index offset into the new file.
//!
//! Readers holding the old file handle keep reading it: nothing is overwritten in place.
//! Transactions pin WAL offsets in their overlays, so a rewrite is skipped (or abandoned at
//! step 3) while any is open.

use super::extent::Extent;
use super::session::{BufVal, Session};
use super::wal::{self, Kind, Record, WalFile, FLAG_SELF_COMMIT, RECORD_HEADER_SIZE};
use super::Result;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Bytes copied per read while appending the WAL's tail under the writer lock.
const TAIL_COPY_CHUNK_BYTES: usize = 8 << 20;

/// Where a run of live data moved: `[old, old+len)` in the old WAL is at `new` in the new one.
#[derive(Clone, Copy)]
struct Moved {
    old: u64,
    len: u64,
    new: u64,
}

struct Plan {
    live: Vec<Extent<BufVal>>,
    live_bytes: u64,
    dead_bytes: u64,
    old_end: u64,
    first_seq: u64,
    old: Arc<File>,
    header: Vec<u8>,
}

impl Session {
    /// Rewrites the WAL if mostly dead (see the module doc).
    pub(super) fn maybe_rewrite_wal(&self) -> Result<()> {
        let Some(plan) = self.plan_rewrite() else {
            return Ok(());
        };
        let tmp = self
            .buffer
            .wal_path(&self.image_id)
            .with_extension("wal.tmp");
        let copied = self.write_live_copy(&plan, &tmp);
        let moved = match copied {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let done = self.finish_rewrite(&plan, &tmp, &moved);
        if !matches!(done, Ok(true)) {
            let _ = std::fs::remove_file(&tmp);
        }
        if let Ok(true) = done {
            log::info!(
                "image {}: WAL rewritten: {} live bytes kept, {} dead bytes dropped",
                self.image_id,
                plan.live_bytes,
                plan.dead_bytes
            );
        }
        done.map(|_| ())
    }

    fn plan_rewrite(&self) -> Option<Plan> {
        let mut w = self.writer.lock().unwrap();
        if w.txns.open > 0 {
            return None;
        }
        let live: Vec<Extent<BufVal>> = self.view.read().unwrap().index.iter().collect();
        let data_bytes = |e: &Extent<BufVal>| {
            if e.value.is_zero() {
                0
            } else {
                e.len << self.page_size_bits
            }
        };
        let live_bytes: u64 = live
            .iter()
            .map(|e| RECORD_HEADER_SIZE + data_bytes(e))
            .sum();
        let used = w.wal.end - wal::HEADER_SIZE;
        let dead_bytes = used.saturating_sub(live_bytes);
        let all_dead = live.is_empty() && used > 0;
        let min = self.buffer.cfg.wal_rewrite_dead_bytes_min;
        if !(all_dead || (dead_bytes >= min && dead_bytes > live_bytes)) {
            return None;
        }
        let first_seq = w.next_seq;
        w.next_seq += live.len() as u64;
        Some(Plan {
            old_end: w.wal.end,
            old: w.wal.file.clone(),
            header: wal::encode_header(&w.wal.header).to_vec(),
            live,
            live_bytes,
            dead_bytes,
            first_seq,
        })
    }

    /// Step 2: the live records, copied into `tmp` (not yet synced).
    fn write_live_copy(&self, plan: &Plan, tmp: &std::path::Path) -> Result<Vec<Moved>> {
        let mut f = std::io::BufWriter::with_capacity(
            1 << 20,
            File::create(tmp).map_err(self.io_err("create WAL copy"))?,
        );
        f.write_all(&plan.header)
            .map_err(self.io_err("write WAL copy"))?;
        let mut pos = wal::HEADER_SIZE;
        let mut moved = Vec::with_capacity(plan.live.len());
        let mut payload = Vec::new();
        for (i, e) in plan.live.iter().enumerate() {
            payload.clear();
            if !e.value.is_zero() {
                payload.resize((e.len << self.page_size_bits) as usize, 0);
                plan.old
                    .read_exact_at(&mut payload, e.value.offset)
                    .map_err(self.io_err("read WAL"))?;
            }
            let rec = Record {
                kind: if e.value.is_zero() {
                    Kind::Zero
                } else {
                    Kind::Data
                },
                flags: FLAG_SELF_COMMIT,
                seq: plan.first_seq + i as u64,
                txn_id: 0,
                change_count: e.value.change,
                first_page: e.start,
                page_count: e.len,
                payload_len: payload.len() as u32,
            };
            f.write_all(&wal::encode_record(&rec, &payload))
                .map_err(self.io_err("write WAL copy"))?;
            pos += RECORD_HEADER_SIZE;
            if !e.value.is_zero() {
                moved.push(Moved {
                    old: e.value.offset,
                    len: payload.len() as u64,
                    new: pos,
                });
            }
            f.write_all(&payload)
                .map_err(self.io_err("write WAL copy"))?;
            pos += payload.len() as u64;
        }
        f.flush().map_err(self.io_err("write WAL copy"))?;
        moved.sort_by_key(|m| m.old);
        Ok(moved)
    }

    /// Step 3. Ok(false): abandoned (a transaction opened meanwhile).
    fn finish_rewrite(&self, plan: &Plan, tmp: &std::path::Path, moved: &[Moved]) -> Result<bool> {
        let mut w = self.writer.lock().unwrap();
        if w.txns.open > 0 {
            return Ok(false);
        }
        let tmp_file = std::fs::OpenOptions::new()
            .append(true)
            .open(tmp)
            .map_err(self.io_err("open WAL copy"))?;
        let tail_base = tmp_file
            .metadata()
            .map_err(self.io_err("stat WAL copy"))?
            .len();
        let mut at = plan.old_end;
        let mut buf = vec![0u8; TAIL_COPY_CHUNK_BYTES.min((w.wal.end - at) as usize)];
        while at < w.wal.end {
            let n = TAIL_COPY_CHUNK_BYTES.min((w.wal.end - at) as usize);
            plan.old
                .read_exact_at(&mut buf[..n], at)
                .map_err(self.io_err("read WAL tail"))?;
            (&tmp_file)
                .write_all(&buf[..n])
                .map_err(self.io_err("write WAL copy"))?;
            at += n as u64;
        }
        tmp_file.sync_all().map_err(self.io_err("fsync WAL copy"))?;
        drop(tmp_file);
        let path = w.wal.path.clone();
        std::fs::rename(tmp, &path).map_err(self.io_err("rename WAL copy"))?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        crate::store::local::fsync_dir(dir).map_err(self.io_err("fsync buffer store"))?;
        let fresh =
            WalFile::reopen(&path, w.wal.header.clone()).map_err(self.io_err("reopen WAL"))?;
        let mut v = self.view.write().unwrap();
        let remapped: Vec<Extent<BufVal>> = v
            .index
            .iter()
            .map(|e| {
                let o = e.value.offset;
                let offset = if e.value.is_zero() {
                    o
                } else if o >= plan.old_end {
                    o - plan.old_end + tail_base
                } else {
                    let i = moved.partition_point(|m| m.old <= o) - 1;
                    let m = moved[i];
                    assert!(o < m.old + m.len, "a live offset below E0 was copied");
                    m.new + (o - m.old)
                };
                Extent {
                    value: BufVal { offset, ..e.value },
                    ..e
                }
            })
            .collect();
        for e in remapped {
            v.index.insert(e.start, e.len, e.value);
        }
        v.wal_file = fresh.file.clone();
        w.wal = fresh;
        drop(v);
        drop(w);
        self.mark_all_durable();
        Ok(true)
    }
}
