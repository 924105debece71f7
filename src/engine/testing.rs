//! Test fixtures, for the engine's unit tests and the conformance suites: an image written
//! straight into an image store, without a session. Built only for tests and with the
//! `testing` feature; the server never calls them.

use super::layer::{write_layer, SourceExtent};
use super::manifest::{self, LayerRef, Manifest};
use crate::store::{keys, ImageStore};
use std::path::Path;

/// Writes an image into `store`: one layer per `(first_page, pages)` in `layers` (oldest
/// first), each a single data extent whose page `p` is filled with `page_byte(p)`, under
/// manifest generation 1 (change count = number of layers; a random writer id, so the first
/// buffer store to open it takes it over). Layer files are staged in `tmp`. Panics on error.
pub fn write_image(
    store: &dyn ImageStore,
    tmp: &Path,
    image_id: &str,
    page_size_bits: u32,
    layers: &[(u64, u64)],
    page_byte: impl Fn(u64) -> u8,
) -> Manifest {
    let page_size = 1usize << page_size_bits;
    let mut refs = Vec::new();
    for (i, &(start, len)) in layers.iter().enumerate() {
        let path = tmp.join(format!("layer{i}"));
        let extents = [SourceExtent::Data { start, len }];
        let (size_bytes, data_pages) =
            write_layer(&path, page_size_bits, extents, |first, _, buf, _| {
                for (j, p) in buf.chunks_mut(page_size).enumerate() {
                    p.fill(page_byte(first + j as u64));
                }
                Ok(())
            })
            .unwrap();
        let blob_id = keys::new_blob_id();
        store.put_file(&keys::blob_key(&blob_id), &path).unwrap();
        refs.push(LayerRef {
            blob_id,
            size_bytes,
            data_pages,
        });
    }
    let m = Manifest {
        format_version: manifest::MANIFEST_FORMAT_VERSION,
        image_id: image_id.into(),
        generation: 1,
        change_count: layers.len() as u64,
        writer_id: manifest::writer_id_hex(keys::random_u128()),
        page_size_bits,
        layers: refs,
        created_at_unix: 0,
    };
    let newest = manifest::load_newest(store, image_id).unwrap();
    assert_eq!(newest.taken_generation, 0, "manifest 1 is new");
    let edit = crate::catalog::Edit::Whole(m.clone());
    let outcome =
        crate::catalog::publish_next(store, &newest, &edit, crate::catalog::Conflict::Fence);
    let crate::catalog::Outcome::Published(m) = outcome.unwrap() else {
        panic!("manifest 1 was not published");
    };
    m
}
