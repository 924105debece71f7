//! The manifest format lives in the catalog ([`crate::catalog::manifest`]), shared with the
//! garbage collector; re-exported here for the engine's modules.

pub use crate::catalog::manifest::*;
