//! ONNX export written from Rust (libtorch has no exporter): the graphs of the image and text
//! encoders, built node by node from the tch model's weights with ONNX's protobuf types (`runtime::onnx_proto`).
//!
//! - `image_encoder.onnx`: `pixel_values` f32 `[batch, 3, S, S]` -> `image_embeds` f32 `[batch, D]`
//! - `text_encoder.onnx`: `input_ids` i64 `[batch, sequence <= 77]` -> `text_embeds` f32 `[batch, D]`,
//!   pooled at the first end token (ArgMax over ids cast to int32, as OpenAI's and HF's exports)
//!
//! Opset 17 (LayerNormalization). Embeddings are projected, not normalised. With fp16 precision the
//! weights and the computation are half precision; inputs and outputs stay f32.

mod clip;
pub(crate) mod graph;

pub use clip::{image_encoder, text_encoder};

pub const OPSET: i64 = 17;
pub const IMAGE_INPUT: &str = "pixel_values";
pub const IMAGE_OUTPUT: &str = "image_embeds";
pub const TEXT_INPUT: &str = "input_ids";
pub const TEXT_OUTPUT: &str = "text_embeds";

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Single precision (any ONNX Runtime provider).
    Fp32,
    /// Half precision weights and computation, f32 inputs and outputs (GPUs).
    Fp16,
    /// int8 weights per output channel, activations quantized at run time (CPUs, the browser):
    /// the fp32 graph quantized by `runtime::bundle::quantize`.
    Int8,
}

impl Precision {
    /// The option value (`fp32`, `fp16`), for messages.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
        }
    }
}
