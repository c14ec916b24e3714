//! `trainer`: OpenAI's CLIP in tch (libtorch), weight import, fine-tuning, and export of bundles
//! that `runtime` runs.
#![warn(clippy::unwrap_used)]

pub mod average;
pub mod cli;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod model;
pub mod onnx;
pub mod optim;
pub mod report;
pub mod train;
pub mod weights;
pub mod zero_shot;

pub use error::{Error, Result};
