//! `runtime`: everything needed to run an xray-clip model bundle.
//!
//! Data flows one way, and the modules in that order:
//! file -> [`image`] (decode PNG/JPEG/DICOM, PIL-exact resize, CLIP normalisation) -> tensor ->
//! [`engine`] (ONNX Runtime, feature `onnx`) -> embedding -> [`scoring`] -> label probabilities.
//! [`text`] turns labels and templates into tokens for the text encoder, [`bundle`] reads and
//! writes the model folder, [`pipeline`] runs the whole flow over many files, [`eval`] scores data
//! sets, [`fs`] writes every file atomically, `serve` (feature `serve`) answers over HTTP and as a DICOM node. Without the `onnx` feature (the browser build)
//! everything but the engine and what drives it is available.
#![warn(clippy::unwrap_used)]

pub mod bundle;
pub mod calibration;
pub mod error;
pub mod eval;
pub mod fs;
pub mod image;
pub mod scoring;
pub mod selection;
pub mod text;

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "onnx")]
pub mod engine;
#[cfg(feature = "onnx")]
pub mod onnx_proto;
#[cfg(feature = "onnx")]
pub mod pipeline;
#[cfg(feature = "onnx")]
pub mod progress;
#[cfg(feature = "serve")]
pub mod serve;

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

/// OpenAI's CLIP BPE vocabulary as a `tokenizer.json` (`models/tokenizer/`, built by
/// `scripts/make_fixtures.py` from the `openai-clip` package's merges), compiled into the binary.
#[cfg(feature = "embedded")]
pub const DEFAULT_TOKENIZER: &[u8] = include_bytes!("../../models/tokenizer/tokenizer.json");

/// The name the built-in tokenizer goes by in messages.
#[cfg(feature = "embedded")]
pub const DEFAULT_TOKENIZER_NAME: &str = "<built-in OpenAI CLIP tokenizer>";

/// The demonstration bundle `models/default`, compiled into the binary, so that an installed or
/// copied binary classifies without the source tree.
#[cfg(feature = "embedded")]
pub const DEFAULT_BUNDLE: bundle::EmbeddedFiles = &[
    (
        "manifest.json",
        include_bytes!("../../models/default/manifest.json"),
    ),
    (
        "image_encoder.onnx",
        include_bytes!("../../models/default/image_encoder.onnx"),
    ),
    (
        "label_embeddings.npy",
        include_bytes!("../../models/default/label_embeddings.npy"),
    ),
    (
        "preprocessor_config.json",
        include_bytes!("../../models/default/preprocessor_config.json"),
    ),
    (
        "self_check.npy",
        include_bytes!("../../models/default/self_check.npy"),
    ),
];

/// The built-in OpenAI tokenizer.
#[cfg(feature = "embedded")]
pub fn default_tokenizer() -> Result<text::tokenizer::ClipTokenizer> {
    text::tokenizer::ClipTokenizer::from_bytes(
        DEFAULT_TOKENIZER,
        std::path::Path::new(DEFAULT_TOKENIZER_NAME),
    )
}

/// Where the model comes from when `--model` is not given.
#[derive(Debug, Clone, PartialEq)]
pub enum DefaultModel {
    /// `XRAY_CLIP_MODEL` names a folder (a missing one is an error, never a fallback).
    FromEnv(std::path::PathBuf),
    /// The demonstration bundle compiled into the binary.
    BuiltIn,
}

/// `XRAY_CLIP_MODEL` if set (non-empty), else the built-in bundle.
pub fn default_model() -> DefaultModel {
    match std::env::var_os("XRAY_CLIP_MODEL") {
        Some(p) if !p.is_empty() => DefaultModel::FromEnv(p.into()),
        _ => DefaultModel::BuiltIn,
    }
}
