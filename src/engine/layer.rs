//! Layer blobs: an immutable, sorted set of page extents (data or zeros). Format in
//! docs/FORMAT.md §Layer blob.
//!
//! ```text
//! header (64 bytes, little-endian)
//!   0 magic "MVPSLAYR"   8 format_version u32   12 page_size_bits u32
//!  16 extent_count u64  24 data_page_count u64  32 index_len u64   40 data_offset u64
//!  48 reserved [u8; 12]                         60 crc32c u32 of bytes 0..60
//! index (index_len bytes, at offset 64)
//!   extent_count × { first_page u64, page_count u64, kind u32 (1 data, 2 zero),
//!                    reserved u32, data_page u64 (first page's index in the data section) }
//!   data_page_count × crc32c u32 (one per data page)
//!   crc32c u32 of the index bytes before it
//! data (at data_offset): data_page_count pages, in extent order
//! ```
//! The index sits before the data so a remote reader gets header and index with one ranged
//! read of the first `data_offset` bytes.

use super::blob_file::BlobFile;
use super::checksum::crc32c;
use super::extent::{Extent, ExtentValue, SortedExtents};
use crate::store::cache::ScanWindow;
use crate::store::{self, BlobReader};
use std::borrow::Borrow;
use std::io;
use std::path::Path;

pub const LAYER_MAGIC: &[u8; 8] = b"MVPSLAYR";
pub const LAYER_FORMAT_VERSION: u32 = 1;
pub const HEADER_SIZE: u64 = 64;
const EXTENT_ENTRY_SIZE: u64 = 32;
const KIND_DATA: u32 = 1;
const KIND_ZERO: u32 = 2;

/// Where a page of a layer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerVal {
    /// Index of the page in the data section.
    Data(u64),
    Zero,
}

impl ExtentValue for LayerVal {
    fn advance(&self, pages: u64) -> Self {
        match self {
            LayerVal::Data(i) => LayerVal::Data(i + pages),
            LayerVal::Zero => LayerVal::Zero,
        }
    }
}

/// What a checkpoint writes: extents in ascending page order; data extents have their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceExtent {
    Data { start: u64, len: u64 },
    Zero { start: u64, len: u64 },
}

/// One index entry of a layer: (first page, page count, kind, first data page).
type IndexEntry = (u64, u64, u32, u64);

/// The index entries of `extents`: neighbouring extents of one kind become one entry (data
/// pages are written in extent order, so their data is contiguous too). A checkpoint of
/// scattered 4 KiB writes has many neighbours, and every entry costs memory in each server
/// that opens the layer. Computed as it goes, so that a layer write holds no list of them.
fn index_entries<T: Borrow<SourceExtent>>(
    extents: impl Iterator<Item = T>,
) -> impl Iterator<Item = IndexEntry> {
    let mut data_page = 0u64;
    let mut pending: Option<IndexEntry> = None;
    let mut extents = extents.map(|e| match *e.borrow() {
        SourceExtent::Data { start, len } => (start, len, KIND_DATA),
        SourceExtent::Zero { start, len } => (start, len, KIND_ZERO),
    });
    std::iter::from_fn(move || loop {
        let Some((start, len, kind)) = extents.next() else {
            return pending.take();
        };
        let first_data_page = data_page;
        if kind == KIND_DATA {
            data_page += len;
        }
        match &mut pending {
            Some(p) if p.2 == kind && p.0 + p.1 == start => p.1 += len,
            _ => {
                let done = pending.replace((start, len, kind, first_data_page));
                if done.is_some() {
                    return done;
                }
            }
        }
    })
}

/// Writes a layer file at `path` from `extents` (in ascending page order; walked three
/// times, so that a checkpoint of 100 000s of extents holds no copies of them).
/// `read_pages(start, len, buf, crcs)` fills the data of `len` pages of a data extent; it
/// may also push their `len` CRC-32Cs onto `crcs` when it knows them already (a compaction
/// copying verified pages), or push none (they are computed here).
/// Returns (size in bytes, data page count). The file is fsynced.
pub fn write_layer<I>(
    path: &Path,
    page_size_bits: u32,
    extents: I,
    mut read_pages: impl FnMut(u64, u64, &mut [u8], &mut Vec<u32>) -> io::Result<()>,
) -> io::Result<(u64, u64)>
where
    I: IntoIterator,
    I::Item: Borrow<SourceExtent>,
    I::IntoIter: Clone,
{
    let extents = extents.into_iter();
    let page_size = 1usize << page_size_bits;
    let (mut entry_count, mut data_pages) = (0u64, 0u64);
    for (_, len, kind, _) in index_entries(extents.clone()) {
        entry_count += 1;
        if kind == KIND_DATA {
            data_pages += len;
        }
    }
    let index_len = entry_count * EXTENT_ENTRY_SIZE + data_pages * 4 + 4;
    let data_offset = HEADER_SIZE + index_len;
    let mut w = BlobFile::create(
        path,
        data_offset,
        data_offset + (data_pages << page_size_bits),
    )?;
    let mut crcs = Vec::with_capacity(data_pages as usize);
    for e in extents.clone() {
        if let SourceExtent::Data { start, len } = *e.borrow() {
            // Read straight into the file's buffer, a bounded piece at a time: an extent can
            // be large.
            let mut done = 0;
            while done < len {
                let spare = w.spare(page_size)?;
                let n = ((spare.len() / page_size) as u64).min(len - done);
                let buf = &mut spare[..(n as usize) * page_size];
                let known = crcs.len();
                read_pages(start + done, n, buf, &mut crcs)?;
                match (crcs.len() - known) as u64 {
                    0 => crcs.extend(buf.chunks(page_size).map(crc32c)),
                    k if k == n => {}
                    k => {
                        return Err(io::Error::other(format!(
                            "layer source gave {k} checksums for {n} pages"
                        )))
                    }
                }
                w.commit((n as usize) * page_size);
                done += n;
            }
        }
    }
    let mut head = Vec::with_capacity(data_offset as usize);
    head.extend_from_slice(&encode_header(
        page_size_bits,
        entry_count,
        data_pages,
        index_len,
    ));
    for (start, len, kind, data_page) in index_entries(extents) {
        head.extend_from_slice(&start.to_le_bytes());
        head.extend_from_slice(&len.to_le_bytes());
        head.extend_from_slice(&kind.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(&data_page.to_le_bytes());
    }
    for c in &crcs {
        head.extend_from_slice(&c.to_le_bytes());
    }
    let icrc = crc32c(&head[HEADER_SIZE as usize..]);
    head.extend_from_slice(&icrc.to_le_bytes());
    debug_assert_eq!(head.len() as u64, data_offset);
    let size = w.finish(&head)?;
    debug_assert_eq!(size, data_offset + (data_pages << page_size_bits));
    Ok((size, data_pages))
}

fn encode_header(bits: u32, extent_count: u64, data_pages: u64, index_len: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_SIZE as usize];
    h[0..8].copy_from_slice(LAYER_MAGIC);
    h[8..12].copy_from_slice(&LAYER_FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&bits.to_le_bytes());
    h[16..24].copy_from_slice(&extent_count.to_le_bytes());
    h[24..32].copy_from_slice(&data_pages.to_le_bytes());
    h[32..40].copy_from_slice(&index_len.to_le_bytes());
    h[40..48].copy_from_slice(&(HEADER_SIZE + index_len).to_le_bytes());
    let crc = crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// An opened layer: its index in memory, its data read on demand.
pub struct Layer {
    pub blob_id: String,
    pub page_size_bits: u32,
    pub index: SortedExtents<LayerVal>,
    crcs: Vec<u32>,
    data_offset: u64,
    reader: Box<dyn BlobReader>,
}

fn corrupt(blob_id: &str, what: &str) -> store::Error {
    store::Error::Remote {
        key: blob_id.to_string(),
        message: format!("corrupt layer: {what}"),
    }
}

impl Layer {
    /// Reads and verifies header and index.
    pub fn open(blob_id: &str, reader: Box<dyn BlobReader>) -> store::Result<Layer> {
        let mut h = [0u8; HEADER_SIZE as usize];
        if reader.size_bytes() < HEADER_SIZE {
            return Err(corrupt(blob_id, "shorter than its header"));
        }
        reader.read_at(0, &mut h)?;
        let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if &h[0..8] != LAYER_MAGIC {
            return Err(corrupt(blob_id, "bad magic"));
        }
        if u32::from_le_bytes(h[60..64].try_into().unwrap()) != crc32c(&h[..60]) {
            return Err(corrupt(blob_id, "header checksum mismatch"));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if version != LAYER_FORMAT_VERSION {
            return Err(corrupt(
                blob_id,
                &format!("format version {version} is not supported"),
            ));
        }
        let bits = u32::from_le_bytes(h[12..16].try_into().unwrap());
        let (extents, data_pages, index_len) = (u64_at(&h, 16), u64_at(&h, 24), u64_at(&h, 32));
        let data_offset = u64_at(&h, 40);
        // Checked arithmetic throughout: the header is untrusted input.
        let expect_index = extents
            .checked_mul(EXTENT_ENTRY_SIZE)
            .and_then(|x| x.checked_add(data_pages.checked_mul(4)?))
            .and_then(|x| x.checked_add(4));
        let expect_size = (bits <= 16)
            .then(|| data_pages.checked_mul(1 << bits))
            .flatten()
            .and_then(|d| d.checked_add(data_offset));
        if expect_index != Some(index_len)
            || expect_index.and_then(|i| i.checked_add(HEADER_SIZE)) != Some(data_offset)
            || expect_size != Some(reader.size_bytes())
        {
            return Err(corrupt(blob_id, "sizes in header do not match the blob"));
        }
        let mut index = vec![0u8; index_len as usize];
        reader.read_at(HEADER_SIZE, &mut index)?;
        let body = &index[..index.len() - 4];
        if u32::from_le_bytes(index[index.len() - 4..].try_into().unwrap()) != crc32c(body) {
            return Err(corrupt(blob_id, "index checksum mismatch"));
        }
        let mut map = SortedExtents::with_capacity(extents as usize);
        for e in body[..(extents * EXTENT_ENTRY_SIZE) as usize].chunks(EXTENT_ENTRY_SIZE as usize) {
            let (start, len) = (u64_at(e, 0), u64_at(e, 8));
            let val = match u32::from_le_bytes(e[16..20].try_into().unwrap()) {
                KIND_DATA => LayerVal::Data(u64_at(e, 24)),
                KIND_ZERO => LayerVal::Zero,
                k => return Err(corrupt(blob_id, &format!("unknown extent kind {k}"))),
            };
            if let LayerVal::Data(i) = val {
                if i.checked_add(len).is_none_or(|x| x > data_pages) {
                    return Err(corrupt(blob_id, "extent points past the data"));
                }
            }
            if !map.push(start, len, val) {
                return Err(corrupt(blob_id, "extents out of order or overlapping"));
            }
        }
        let crcs = body[(extents * EXTENT_ENTRY_SIZE) as usize..]
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok(Layer {
            blob_id: blob_id.to_string(),
            page_size_bits: bits,
            index: map,
            crcs,
            data_offset,
            reader,
        })
    }

    /// Data pages the layer holds.
    pub fn data_pages(&self) -> u64 {
        self.crcs.len() as u64
    }

    /// Size of the blob.
    pub fn size_bytes(&self) -> u64 {
        self.reader.size_bytes()
    }

    pub fn lookup(&self, start: u64, len: u64) -> Vec<Extent<LayerVal>> {
        self.index.lookup(start, len)
    }

    /// A reader for one pass over this layer's data in page order (a merge), where the store
    /// has a cheaper way to do that than `read_at` (`BlobReader::stream`).
    pub fn data_stream(&self) -> Option<Box<dyn store::BlobStream + '_>> {
        self.reader.stream()
    }

    /// `read_data` (through `stream`, from `data_stream`, when there is one), and pushes the
    /// verified checksums of the pages read onto `crcs`. Pages that fail their checksums
    /// through the stream, or a failed stream read, are read again by `read_data`.
    pub fn read_data_with_crcs(
        &self,
        stream: Option<&mut (dyn store::BlobStream + '_)>,
        data_page: u64,
        buf: &mut [u8],
        crcs: &mut Vec<u32>,
    ) -> store::Result<()> {
        let offset = self.data_offset + (data_page << self.page_size_bits);
        let streamed = stream
            .is_some_and(|s| s.read_at(offset, buf).is_ok() && self.verify(data_page, buf).is_ok());
        if !streamed {
            self.read_data(data_page, buf)?;
        }
        let first = data_page as usize;
        let n = buf.len() >> self.page_size_bits;
        crcs.extend_from_slice(&self.crcs[first..first + n]);
        Ok(())
    }

    /// Asks the blob's reader to fetch data pages `[data_page, +pages)` ahead for `scan`
    /// (see `engine::scan`); false if its readahead budget stopped it short.
    pub fn prefetch_data(&self, data_page: u64, pages: u64, scan: &ScanWindow) -> bool {
        let bits = self.page_size_bits;
        (self.reader).prefetch(self.data_offset + (data_page << bits), pages << bits, scan)
    }

    /// Reads data pages `[data_page, +buf.len()/page_size)` and verifies their checksums. A
    /// page that fails its checksum is read once more from the store itself, past the
    /// caches, which drop their copies (a flipped bit in memory or on a cache disk, or a bad
    /// answer): only a blob that is corrupt in the store is an error.
    pub fn read_data(&self, data_page: u64, buf: &mut [u8]) -> store::Result<()> {
        let offset = self.data_offset + (data_page << self.page_size_bits);
        self.reader.read_at(offset, buf)?;
        if let Err(e) = self.verify(data_page, buf) {
            log::warn!("{e}; reading the range from the image store again");
            self.reader.refetch(offset, buf)?;
            self.verify(data_page, buf)?;
        }
        Ok(())
    }

    /// Checks pages read from data page `data_page` on against the index's checksums.
    fn verify(&self, data_page: u64, buf: &[u8]) -> store::Result<()> {
        let ps = 1usize << self.page_size_bits;
        for (i, page) in buf.chunks(ps).enumerate() {
            let want = self.crcs[data_page as usize + i];
            if crc32c(page) != want {
                let page_no = data_page + i as u64;
                return Err(corrupt(
                    &self.blob_id,
                    &format!("checksum mismatch in data page {page_no}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;
    use crate::store::ImageStore;

    #[test]
    fn write_open_read_and_detect_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("s")).unwrap();
        let path = dir.path().join("layer");
        let exts = vec![
            SourceExtent::Data { start: 2, len: 3 },
            SourceExtent::Zero {
                start: 10,
                len: 100,
            },
            SourceExtent::Data { start: 200, len: 1 },
        ];
        let (size, pages) = write_layer(&path, 9, &exts, |start, n, buf, _crcs| {
            for (i, p) in buf.chunks_mut(512).enumerate() {
                p.fill((start + i as u64) as u8);
            }
            assert!(n > 0);
            Ok(())
        })
        .unwrap();
        assert_eq!(pages, 4);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        store.put_file("blobs/l", &path).unwrap();
        let layer = Layer::open("l", store.open_blob("blobs/l").unwrap()).unwrap();
        let l = layer.lookup(0, 300);
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].value, LayerVal::Data(0));
        assert_eq!(l[1].value, LayerVal::Zero);
        assert_eq!(l[2].value, LayerVal::Data(3));
        let mut buf = vec![0u8; 1024];
        layer.read_data(1, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 3) && buf[512..].iter().all(|&b| b == 4));
        // Flip one data byte: reads of that page fail with a checksum error.
        let mut raw = std::fs::read(&path).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 0xff;
        store.put("blobs/bad", &raw).unwrap();
        let bad = Layer::open("bad", store.open_blob("blobs/bad").unwrap()).unwrap();
        let mut page = vec![0u8; 512];
        assert!(bad
            .read_data(3, &mut page)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        raw[70] ^= 0xff;
        store.put("blobs/bad2", &raw).unwrap();
        assert!(Layer::open("bad2", store.open_blob("blobs/bad2").unwrap()).is_err());
    }

    #[test]
    fn neighbouring_extents_of_one_kind_share_an_index_entry() {
        use SourceExtent::{Data, Zero};
        let exts = [
            Data { start: 0, len: 2 },
            Data { start: 2, len: 3 },
            Zero { start: 5, len: 1 },
            Zero { start: 6, len: 4 },
            Data { start: 20, len: 1 },
            Data { start: 21, len: 1 },
            Data { start: 23, len: 1 },
        ];
        let entries: Vec<IndexEntry> = index_entries(exts.iter()).collect();
        assert_eq!(
            entries,
            [
                (0, 5, KIND_DATA, 0),
                (5, 5, KIND_ZERO, 5),
                (20, 2, KIND_DATA, 5),
                (23, 1, KIND_DATA, 7)
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("s")).unwrap();
        let path = dir.path().join("layer");
        let (_, pages) = write_layer(&path, 9, exts, |start, _, buf, _| {
            for (i, p) in buf.chunks_mut(512).enumerate() {
                p.fill((start + i as u64) as u8);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(pages, 8);
        store.put_file("blobs/n", &path).unwrap();
        let layer = Layer::open("n", store.open_blob("blobs/n").unwrap()).unwrap();
        assert_eq!(layer.index.len(), 4);
        let mut page = vec![0u8; 512];
        layer.read_data(6, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == 21),
            "data page 6 holds image page 21"
        );
    }

    /// Passes reads through, flipping the byte at `at` in the next `flips` reads that cover
    /// it (a bad answer from the store, or a cached copy gone bad).
    struct FlipReads {
        inner: Box<dyn BlobReader>,
        at: u64,
        flips: std::sync::atomic::AtomicU32,
    }

    impl BlobReader for FlipReads {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> store::Result<()> {
            use std::sync::atomic::Ordering::SeqCst;
            self.inner.read_at(offset, buf)?;
            let covers = offset <= self.at && self.at < offset + buf.len() as u64;
            if covers
                && self
                    .flips
                    .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                buf[(self.at - offset) as usize] ^= 0x40;
            }
            Ok(())
        }
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
    }

    /// A page that fails its checksum when read through the block cache is read again from
    /// the store, past the cache, and the cache's bad copy is never served; a page bad in
    /// the store itself stays an error.
    #[test]
    fn a_bad_page_through_the_cache_is_read_again_from_the_store() {
        use crate::store::cache::BlockCache;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("s")).unwrap();
        let path = dir.path().join("layer");
        let exts = [SourceExtent::Data { start: 0, len: 8 }];
        let (size, _) = write_layer(&path, 12, exts, |_, _, buf, _| {
            buf.fill(9);
            Ok(())
        })
        .unwrap();
        store.put_file("blobs/l", &path).unwrap();
        for (flips, ok) in [(1, true), (2, false)] {
            let cache = std::sync::Arc::new(BlockCache::new(1 << 20, 4096).unwrap());
            let reader = FlipReads {
                inner: store.open_blob("blobs/l").unwrap(),
                at: size - 1,
                flips: flips.into(),
            };
            let layer = Layer::open("l", Box::new(cache.wrap("l", Box::new(reader)))).unwrap();
            let mut page = vec![0u8; 4096];
            let r = layer.read_data(7, &mut page);
            assert_eq!(r.is_ok(), ok, "{flips} bad reads: {r:?}");
            if ok {
                assert!(page.iter().all(|&b| b == 9));
                // Read again: from the cache, which holds the good bytes now.
                page.fill(0);
                layer.read_data(7, &mut page).unwrap();
                assert!(page.iter().all(|&b| b == 9));
            } else {
                assert!(r.unwrap_err().to_string().contains("checksum mismatch"));
            }
        }
    }

    /// Header fields that would overflow the size arithmetic are refused, not a panic.
    #[test]
    fn absurd_header_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("s")).unwrap();
        let path = dir.path().join("layer");
        let exts = [SourceExtent::Data { start: 0, len: 2 }];
        write_layer(&path, 9, exts, |_, _, buf, _| {
            buf.fill(1);
            Ok(())
        })
        .unwrap();
        let good = std::fs::read(&path).unwrap();
        let with_header_field = |at: usize, bytes: &[u8]| {
            let mut raw = good.clone();
            raw[at..at + bytes.len()].copy_from_slice(bytes);
            let crc = crc32c(&raw[..60]);
            raw[60..64].copy_from_slice(&crc.to_le_bytes());
            store.put("blobs/x", &raw).unwrap();
            Layer::open("x", store.open_blob("blobs/x").unwrap()).err()
        };
        let huge = [
            (16, u64::MAX),
            (24, u64::MAX / 3),
            (24, 1 << 62),
            (32, u64::MAX),
            (40, u64::MAX),
        ];
        for (at, value) in huge {
            let err = with_header_field(at, &value.to_le_bytes());
            assert!(err.is_some(), "header field at {at} = {value} accepted");
        }
        assert!(with_header_field(12, &70u32.to_le_bytes()).is_some());
        // The unchanged header (re-checksummed) still opens: the refusals above are the values.
        assert!(with_header_field(16, &good[16..24]).is_none());
    }

    /// Checksums a source already knows are written as given (compaction copies verified
    /// pages); a wrong count is an error, not a silently short index.
    #[test]
    fn known_checksums_are_used_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("s")).unwrap();
        let exts = vec![SourceExtent::Data { start: 0, len: 2 }];
        let path = dir.path().join("given");
        write_layer(&path, 9, &exts, |_, n, buf, crcs| {
            buf.fill(7);
            // The first page's checksum is deliberately wrong: reads of it must fail.
            crcs.push(0);
            crcs.extend(buf.chunks(512).skip(1).map(crc32c));
            assert_eq!(n, 2);
            Ok(())
        })
        .unwrap();
        store.put_file("blobs/given", &path).unwrap();
        let layer = Layer::open("given", store.open_blob("blobs/given").unwrap()).unwrap();
        let mut page = vec![0u8; 512];
        assert!(layer.read_data(0, &mut page).is_err());
        layer.read_data(1, &mut page).unwrap();
        let mut crcs = Vec::new();
        layer
            .read_data_with_crcs(None, 1, &mut page, &mut crcs)
            .unwrap();
        assert_eq!(crcs, vec![crc32c(&[7u8; 512])]);
        let short = dir.path().join("short");
        let bad = write_layer(&short, 9, &exts, |_, _, _, crcs| {
            crcs.push(1);
            Ok(())
        });
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("1 checksums for 2 pages"));
    }
}
