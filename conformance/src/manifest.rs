//! Reading an image's manifests (DESIGN §3, docs/FORMAT.md) to tell when written data has
//! been checkpointed: the newest manifest's layers then hold every page written.

use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Manifest file names of an image in a local image store, newest first (a name is
/// `u64::MAX - generation` in 16 hex digits, so the newest sorts first).
pub fn local_names(image_store: &Path, image_id: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(image_store.join("images").join(image_id)) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".json"))
        .collect();
    v.sort();
    v
}

/// The newest manifest of an image in a local image store, parsed.
pub fn newest_local(image_store: &Path, image_id: &str) -> Option<Value> {
    let name = local_names(image_store, image_id).into_iter().next()?;
    let p = image_store.join("images").join(image_id).join(name);
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Data pages held by a manifest's layers (pages shadowed in older layers count again).
pub fn data_pages(m: &Value) -> u64 {
    let layers = m["layers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    layers
        .iter()
        .map(|l| l["data_pages"].as_u64().unwrap_or(0))
        .sum()
}

/// Waits until `newest()` returns a manifest whose layers hold at least `pages` data pages:
/// with every page written once, all of them are then checkpointed.
#[track_caller]
pub fn wait_for_pages(pages: u64, timeout: Duration, newest: impl Fn() -> Option<Value>) {
    crate::tools::wait_for(&format!("{pages} checkpointed pages"), timeout, || {
        (newest().map(|m| data_pages(&m)).unwrap_or(0) >= pages).then_some(())
    });
}
