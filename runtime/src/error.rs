//! The one error type of the `runtime` crate.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while reading inputs, bundles or running a model.
///
/// Every variant names the file (when there is one) and what was expected, so that the one-line
/// message a binary prints is enough to fix the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- files -------------------------------------------------------------------------------
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {reason}")]
    OutputConflict { path: PathBuf, reason: String },

    // --- image decoding ------------------------------------------------------------------------
    #[error("{path}: empty file")]
    EmptyFile { path: PathBuf },
    #[error("{path}: not a PNG, JPEG or DICOM file")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: cannot decode {format} image: {reason}")]
    Decode {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error(
        "{path}: image of {width}x{height} ({frames} frame(s)) exceeds the limit of {limit} pixels"
    )]
    TooLarge {
        path: PathBuf,
        width: u64,
        height: u64,
        frames: u64,
        limit: u64,
    },
    #[error("{path}: image of {width}x{height} has an aspect ratio above the limit of {limit}:1 (no radiograph is that shape; resizing it would need {resized_pixels} pixels)")]
    AspectRatio {
        path: PathBuf,
        width: u64,
        height: u64,
        limit: u64,
        resized_pixels: u64,
    },
    #[error("cannot preprocess a {width}x{height} image: {reason}")]
    Preprocess {
        width: u32,
        height: u32,
        reason: String,
    },
    #[error("{path}: DICOM file has no pixel data")]
    NoPixelData { path: PathBuf },
    #[error("{path}: unsupported DICOM: {reason}")]
    UnsupportedDicom { path: PathBuf, reason: String },

    // --- bundles -------------------------------------------------------------------------------
    #[error("bundle {bundle}: {reason}")]
    Bundle { bundle: PathBuf, reason: String },
    #[error("bundle {bundle}: file {file} has sha256 {actual}, manifest says {expected}")]
    HashMismatch {
        bundle: PathBuf,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    // --- text ----------------------------------------------------------------------------------
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    // --- labels and arguments ------------------------------------------------------------------
    #[error("{0}")]
    InvalidArgument(String),

    // --- inference -----------------------------------------------------------------------------
    #[error("{context}: {reason}")]
    Inference { context: String, reason: String },
    #[error("shape mismatch in {what}: expected {expected}, got {actual}")]
    Shape {
        what: String,
        expected: String,
        actual: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub(crate) fn bundle(bundle: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Bundle {
            bundle: bundle.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }
}
