//! The one error type of the `trainer` crate. As in `runtime`, a wrapped library error ends the
//! message and is not also returned by `source()`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] runtime::Error),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{path}: weights do not fit the model: {}", .problems.join("; "))]
    WeightMismatch {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("libtorch: {0}")]
    Torch(tch::TchError),
    /// Command-line options that conflict or are out of range.
    #[error("{0}")]
    Usage(String),
    /// A model configuration that is not valid (a preset name, `--image-size`, a config.json).
    #[error("model configuration: {0}")]
    ModelConfig(String),
    /// The model lacks a weight the exported graph needs (a checkpoint of another architecture).
    #[error("the model has no weight {0}")]
    MissingWeight(String),
    #[error(
        "the tokenizer does not fit the model: token id {max_id} and {tokens} tokens per prompt, the model has {vocab} token embeddings and {positions} positions (use the tokenizer the weights came with)"
    )]
    TokenizerMismatch {
        max_id: i64,
        tokens: usize,
        vocab: i64,
        positions: i64,
    },
    #[error("no checkpoint to start from: pass --model DIR or set {env} (looked at {conventional}); make one with `trainer init --from clip-vit-base-patch32/ --out {conventional}` (README: \"Get a real model\") or `trainer init --config small --out checkpoints/small` for random weights")]
    NoStartingModel {
        env: &'static str,
        conventional: &'static str,
    },
    #[error("CUDA is not available (build with --features cuda on a GPU machine)")]
    CudaUnavailable,
    /// Training data that cannot be used as asked (unreadable images, empty splits).
    #[error("data: {0}")]
    Dataset(String),
    /// A chart that could not be drawn.
    #[error("{0}")]
    Plot(String),
    #[error("training diverged: the loss is {value} at epoch {epoch}, step {step}")]
    NonFiniteLoss {
        epoch: usize,
        step: usize,
        value: f64,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

// By hand rather than `#[from]`, which would also return the libtorch error from `source()` while
// the message already ends with it.
impl From<tch::TchError> for Error {
    fn from(cause: tch::TchError) -> Self {
        Error::Torch(cause)
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}
