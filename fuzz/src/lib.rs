//! Entry points of the fuzz targets (one per reader); see `entries.rs`.
pub mod entries;
