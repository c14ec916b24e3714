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
    /// Options or a model configuration that do not fit together.
    #[error("{0}")]
    Config(String),
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
