//! Reads: pages resolved to their newest location — a transaction's own writes, the log's
//! buffered pages, the version's layers newest first, else zeros — then copied with no lock
//! held.
//!
//! The buffered pages are looked up before the layers, each under its own lock. That is
//! enough because a checkpoint installs its layers before it drops the pages they hold from
//! the buffer: a read that found a page gone from the buffer finds it in a layer. Copying
//! after the locks are released is safe because nothing is overwritten in place: WAL
//! segments are append-only (an old one is deleted whole, and an open handle keeps its
//! bytes) and layers are immutable.

use super::extent::{gaps, ExtentMap};
use super::layer::{Layer, LayerVal};
use super::log::BufVal;
use super::session::Session;
use super::txn::Txn;
use super::wal;
use super::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A resolved piece of a read: `len` pages starting at `start` come from `src`.
enum Src {
    /// A WAL segment file, at a byte offset.
    Wal(Arc<File>, u64),
    Layer(Arc<Layer>, u64),
    Zero,
}

impl Session {
    /// Reads `buf.len()` bytes at byte `offset` (any alignment), through `txn`'s own writes
    /// if given (read-your-writes). The range is pre-validated.
    pub fn read(&self, txn: Option<&Txn>, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_usable()?;
        if buf.is_empty() {
            return Ok(());
        }
        let ps = self.page_size();
        let first = offset / ps;
        let last = (offset + buf.len() as u64 - 1) / ps;
        let n = last - first + 1;
        let overlay = txn.map(|t| &t.overlay);
        if self.reads_ahead {
            self.scan_hint(first, n);
        }
        if offset.is_multiple_of(ps) && (buf.len() as u64).is_multiple_of(ps) {
            return self.read_pages(overlay, first, n, buf);
        }
        let mut scratch = vec![0u8; (n * ps) as usize];
        self.read_pages(overlay, first, n, &mut scratch)?;
        let skip = (offset - first * ps) as usize;
        buf.copy_from_slice(&scratch[skip..skip + buf.len()]);
        Ok(())
    }

    /// Scan hint (src/engine/scan.rs): a read that continues an image reader going in order
    /// has the layer pages of the reader's next window prefetched, across layers.
    fn scan_hint(&self, first: u64, n: u64) {
        let Some(ahead) = self.scans.note(first, n) else {
            return;
        };
        let Ok(pieces) = self.resolve(None, ahead.first, ahead.pages) else {
            return;
        };
        let layers = pieces.iter().filter_map(|(start, len, src)| match src {
            Src::Layer(layer, data_page) => Some((*start, layer, *data_page, *len)),
            _ => None,
        });
        self.scans.prefetch(ahead, layers);
    }

    /// Reads whole pages `[first, first+n)` into `buf` (exactly `n` pages long).
    pub fn read_pages(
        &self,
        overlay: Option<&ExtentMap<BufVal>>,
        first: u64,
        n: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let pieces = self.resolve(overlay, first, n)?;
        let bits = self.page_size_bits;
        for (start, len, src) in pieces {
            let at = ((start - first) << bits) as usize;
            let out = &mut buf[at..at + (len << bits) as usize];
            match src {
                Src::Zero => out.fill(0),
                Src::Wal(file, off) => file
                    .read_exact_at(out, off)
                    .map_err(self.io_err("read WAL"))?,
                Src::Layer(layer, data_page) => {
                    layer
                        .read_data(data_page, out)
                        .map_err(|source| Error::Store {
                            image: self.image_id.clone(),
                            source,
                        })?
                }
            }
        }
        Ok(())
    }

    /// Maps pages to their newest location: the transaction overlay, the buffer, then layers
    /// newest first, then zeros.
    fn resolve(
        &self,
        overlay: Option<&ExtentMap<BufVal>>,
        first: u64,
        n: u64,
    ) -> Result<Vec<(u64, u64, Src)>> {
        let buffered = self.log.buffered.read().unwrap();
        let mut pieces = Vec::new();
        let mut todo = vec![(first, n)];
        for map in overlay.into_iter().chain(std::iter::once(&buffered.index)) {
            let mut next = Vec::new();
            for (s, l) in todo {
                let found = map.lookup(s, l);
                for e in &found {
                    let src = if e.value.is_zero() {
                        Src::Zero
                    } else {
                        let (seg, off) = wal::split_position(e.value.pos);
                        let file = buffered.segments.get(&seg).ok_or_else(|| Error::Io {
                            image: self.image_id.clone(),
                            op: "read WAL",
                            source: std::io::Error::other(format!(
                                "segment {seg} is not open (page {})",
                                e.start
                            )),
                        })?;
                        Src::Wal(file.clone(), off)
                    };
                    pieces.push((e.start, e.len, src));
                }
                next.extend(gaps(s, l, &found));
            }
            todo = next;
        }
        drop(buffered);
        let version = self.version.read();
        for layer in &version.layers {
            if todo.is_empty() {
                break;
            }
            let mut next = Vec::new();
            for (s, l) in todo {
                let found = layer.lookup(s, l);
                for e in &found {
                    let src = match e.value {
                        LayerVal::Zero => Src::Zero,
                        LayerVal::Data(i) => Src::Layer(layer.clone(), i),
                    };
                    pieces.push((e.start, e.len, src));
                }
                next.extend(gaps(s, l, &found));
            }
            todo = next;
        }
        for (s, l) in todo {
            pieces.push((s, l, Src::Zero));
        }
        Ok(pieces)
    }
}
