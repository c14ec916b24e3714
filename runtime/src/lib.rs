//! `runtime`: everything needed to run an xray-clip model bundle.
//!
//! Data flows one way: file -> [`decode`] -> [`preprocess`] -> encoder ([`engine`], feature `onnx`)
//! -> [`scoring`]. [`bundle`] reads and writes the model folder, [`tokenizer`] and [`labels`] build
//! prompts. Without the `onnx` feature (the browser build) everything but the engine is available.
#![warn(clippy::unwrap_used)]

pub mod bundle;
pub mod datasets;
pub mod decode;
pub mod dicom;
pub mod error;
pub mod files;
pub mod fsutil;
pub mod labels;
pub mod metrics;
pub mod npy;
pub mod preprocess;
pub mod scoring;
pub mod tokenizer;

#[cfg(feature = "onnx")]
pub mod assemble;
#[cfg(feature = "onnx")]
pub mod cli;
#[cfg(feature = "onnx")]
pub mod engine;
#[cfg(feature = "onnx")]
pub mod eval;
#[cfg(feature = "onnx")]
pub mod pipeline;
#[cfg(feature = "onnx")]
pub mod plot;

pub use error::{Error, Result};

/// Folder for what `scripts/setup.sh` installs (ONNX Runtime, Python tools): `XRAY_CLIP_CACHE`, else
/// `~/.cache/xray-clip`.
pub fn cache_dir() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("XRAY_CLIP_CACHE") {
        return p.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    std::path::Path::new(&home).join(".cache").join("xray-clip")
}

/// The bundle used when none is given: `XRAY_CLIP_MODEL`, else `models/default` next to the
/// workspace this binary was built from.
pub fn default_model_dir() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("XRAY_CLIP_MODEL") {
        return p.into();
    }
    workspace_dir().join("models").join("default")
}

/// OpenAI's CLIP BPE vocabulary as a `tokenizer.json` (built by `scripts/make_fixtures.py` from the
/// `openai-clip` package's merges), shipped in `models/tokenizer/`.
pub fn default_tokenizer_path() -> std::path::PathBuf {
    workspace_dir()
        .join("models")
        .join("tokenizer")
        .join("tokenizer.json")
}

/// The workspace this crate was built in (the parent of `runtime/`).
fn workspace_dir() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}
