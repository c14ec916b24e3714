//! `trainer`: OpenAI's CLIP in tch (libtorch), weight import, fine-tuning, and export of bundles
//! that `runtime` runs.
#![warn(clippy::unwrap_used)]

pub mod error;
pub mod model;
pub mod weights;

pub use error::{Error, Result};
