//! The one error type of the `trainer` crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] runtime::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{path}: weights do not fit the model: {}", .problems.join("; "))]
    WeightMismatch {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Config(String),
    #[error("data: {0}")]
    Data(String),
    #[error("training diverged: the loss is {value} at epoch {epoch}, step {step}")]
    NonFiniteLoss {
        epoch: usize,
        step: usize,
        value: f64,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
