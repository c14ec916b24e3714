//! The one error type of the `runtime` crate.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while reading inputs, bundles or running a model.
///
/// Every variant names the file (when there is one) and what was expected, so that the one-line
/// message a binary prints is enough to fix the problem. A variant that wraps another library's
/// error keeps it, typed, in its `cause` field and ends its message with it; it is not also
/// returned by `source()`, so a printer of the error chain never shows it twice.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- files -------------------------------------------------------------------------------
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path}: {reason}")]
    OutputConflict { path: PathBuf, reason: String },

    // --- image decoding ------------------------------------------------------------------------
    #[error("{path}: empty file")]
    EmptyFile { path: PathBuf },
    #[error("{path}: not a PNG, JPEG or DICOM file")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: cannot decode {format} image: {cause}")]
    Image {
        path: PathBuf,
        format: &'static str,
        cause: image::ImageError,
    },
    #[error("{path}: cannot decode DICOM image: {cause}")]
    Dicom {
        path: PathBuf,
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
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
    #[error("{path}: invalid JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },

    // --- text ----------------------------------------------------------------------------------
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tokenizer {path}: {}{cause}", .text.as_ref().map(|t| format!("{t:?}: ")).unwrap_or_default())]
    TokenizerLibrary {
        path: PathBuf,
        /// The text being encoded, when the error is about one.
        text: Option<String>,
        cause: tokenizers::Error,
    },

    // --- labels, data sets, paths ----------------------------------------------------------------
    /// A label list, label set or prompt template that cannot be used.
    #[error("{0}")]
    Labels(String),
    /// A data set that cannot be read or split as asked.
    #[error("{0}")]
    Dataset(String),
    /// A calibration that cannot be fitted from the images given.
    #[error("{0}")]
    Calibration(String),
    /// A path that cannot be used as given (a folder where a file is wanted, a name that leaves
    /// its folder).
    #[error("{0}")]
    BadPath(String),
    /// An export that `runtime import` / `assemble` cannot turn into a bundle.
    #[error("{0}")]
    Import(String),
    /// Bundles that `runtime ensemble` cannot merge.
    #[error("{0}")]
    Ensemble(String),
    /// A chart that could not be drawn.
    #[error("{0}")]
    Plot(String),

    // --- inference -----------------------------------------------------------------------------
    #[error("{context}: {reason}")]
    Inference { context: String, reason: String },
    #[cfg(feature = "onnx")]
    #[error("{context}: {cause}")]
    Ort { context: String, cause: ort::Error },
    #[error("shape mismatch in {what}: expected {expected}, got {actual}")]
    Shape {
        what: String,
        expected: String,
        actual: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            cause,
        }
    }

    pub(crate) fn bundle(bundle: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Bundle {
            bundle: bundle.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }
}
