//! `runtime eval`: encodes every image of a data set once, scores one or more prompt templates (or
//! the bundle's own label embeddings) against those embeddings, and reports top-1/top-5, per-class
//! figures, macro-F1 and the confusion matrix.

//!
//! Data sets ([`datasets`]: folder, UNIFESP, IRMA, splits) and [`metrics`] build without ONNX
//! Runtime (the trainer and the browser use them); the run itself and its report need the engine.

pub mod datasets;
pub mod metrics;
#[cfg(feature = "plot")]
pub mod plot;
#[cfg(feature = "onnx")]
pub mod report;
#[cfg(feature = "onnx")]
mod run;

#[cfg(feature = "onnx")]
pub use run::{
    bundle_embeddings, evaluate, missing_labels_hint, EvalOptions, Evaluation, MultiLabel,
    TemplateResult,
};
