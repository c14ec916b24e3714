//! What a bundle's manifest records of its quantization (`runtime quantize`): plain data, read
//! by every build (the browser page too); the quantizer itself is `quantize` (feature `onnx`).

use serde::{Deserialize, Serialize};

/// What was quantized.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuantizeStats {
    /// MatMul and Gemm nodes now integer.
    pub matmuls: usize,
    pub convs: usize,
    /// Embedding tables (Gather) stored as int8.
    pub gathers: usize,
    /// Weights (elements) now int8, and those left in float.
    pub int8_weights: usize,
    pub float_weights: usize,
    /// The largest MatMul/Gemm weight magnitude (63, or 127 with --full-range).
    pub weight_max: i32,
    /// Activations quantized with fixed scales measured on calibration images (`--calibrate`);
    /// the others get their scales at run time.
    #[serde(default)]
    pub static_activations: usize,
}

/// How a bundle was quantized and checked (`manifest.json`'s `quantization`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantization {
    /// `int8`.
    pub precision: String,
    /// The method, in words.
    pub scheme: String,
    /// The fp32 bundle it was made from: its name and image encoder's sha256.
    pub source: String,
    pub image_encoder: QuantizeStats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<QuantizeStats>,
    /// Images the static activation ranges were measured on (`--calibrate`; 0: dynamic).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub calibration_images: usize,
    /// The check against the fp32 bundle on labelled images, when one was run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<AgreementCheck>,
}

/// int8 against fp32 on the same labelled images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreementCheck {
    pub dataset: String,
    pub split: String,
    pub images: usize,
    /// Share of images whose top-1 label is the same.
    pub agreement: f64,
    pub fp32_top1: f64,
    pub int8_top1: f64,
    /// Cosine of the two image embeddings: mean and smallest.
    pub mean_cosine: f64,
    pub min_cosine: f64,
    /// The agreement the command required.
    pub min_agreement: f64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl AgreementCheck {
    pub fn passed(&self) -> bool {
        self.agreement >= self.min_agreement
    }
}
