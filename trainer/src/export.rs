//! Checkpoint -> model bundle: ONNX encoders, label embeddings of the label set averaged over the
//! templates, tokenizer, manifest with provenance and metrics. Written atomically by the runtime's
//! `BundleWriter` (staging folder, verified, renamed into place).

use std::path::{Path, PathBuf};

use runtime::bundle::quantize;
use runtime::bundle::{
    self, Bundle, BundleLabel, BundleWriter, Manifest, Provenance, FORMAT_VERSION,
};
use runtime::text::labels::Label;
use runtime::text::tokenizer::ClipTokenizer;
use tch::{Device, Kind};

use crate::error::{Error, Result};
use crate::onnx::{self, Precision};
use crate::weights;
use crate::zero_shot::{label_embeddings, template_tokens};

pub struct ExportSpec {
    pub checkpoint: PathBuf,
    pub labels: Vec<Label>,
    pub templates: Vec<String>,
    pub precision: Precision,
    pub name: String,
    pub description: String,
    /// Leave the text encoder and tokenizer out (a fixed-label bundle).
    pub without_text_encoder: bool,
    pub provenance: Provenance,
}

/// The tokenizer stored with a checkpoint, else OpenAI's vocabulary (built in): its bytes and a
/// name for messages.
pub fn checkpoint_tokenizer(checkpoint: &Path) -> Result<(Vec<u8>, PathBuf)> {
    let p = checkpoint.join("tokenizer.json");
    if p.exists() {
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        Ok((bytes, p))
    } else {
        Ok((
            runtime::DEFAULT_TOKENIZER.to_vec(),
            PathBuf::from(runtime::DEFAULT_TOKENIZER_NAME),
        ))
    }
}

/// Where the checkpoint's weights came from, following `provenance.json` (written by `trainer init`).
pub fn base_weights(checkpoint: &Path) -> String {
    std::fs::read_to_string(checkpoint.join("provenance.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["source"].as_str().map(str::to_string))
        .unwrap_or_else(|| checkpoint.display().to_string())
}

/// Exports as the bundle folder `out` (by the rule of `runtime::fs::resolve_output`: an
/// existing bundle is replaced only with `force`, any other folder gets the bundle inside it).
pub fn export(spec: ExportSpec, out: &Path, force: bool) -> Result<Bundle> {
    if spec.labels.is_empty() || spec.templates.is_empty() {
        return Err(Error::Usage(
            "export needs labels and at least one template".into(),
        ));
    }
    let loaded = weights::load(&spec.checkpoint, Device::Cpu)?;
    let config = &loaded.model.config;
    let (tok_bytes, tok_path) = checkpoint_tokenizer(&spec.checkpoint)?;
    let tokenizer = ClipTokenizer::from_bytes(&tok_bytes, &tok_path)?;
    let per_template = template_tokens(
        &tokenizer,
        &spec.labels,
        &spec.templates,
        &config.text_config,
        Device::Cpu,
    )?;
    let emb = label_embeddings(&loaded.model, &per_template)
        .to_kind(Kind::Float)
        .contiguous();
    let emb: Vec<f32> = Vec::<f32>::try_from(emb.reshape([-1])).map_err(Error::Torch)?;
    let logit_scale = loaded.model.logit_scale.exp().double_value(&[]) as f32;
    let (image, image_stats) = encoder(
        |p| onnx::image_encoder(&loaded.vs, config, p),
        spec.precision,
        "image_encoder.onnx",
    )?;
    let labels = BundleLabel::fill_all(&spec.labels, &spec.templates)?;
    let mut provenance = spec.provenance;
    if provenance.base_weights.is_empty() {
        provenance.base_weights = base_weights(&spec.checkpoint);
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: spec.name,
        description: spec.description,
        labels,
        templates: spec.templates.clone(),
        embedding_dim: config.projection_dim as usize,
        logit_scale,
        image_embeds_normalized: false,
        preprocessing: config.vision_config.preprocessing(),
        files: Default::default(),
        provenance,
        quantization: None,
        self_check: None,
        calibration: None,
    };
    let mut text = None;
    if !spec.without_text_encoder {
        text = Some(encoder(
            |p| onnx::text_encoder(&loaded.vs, config, p),
            spec.precision,
            "text_encoder.onnx",
        )?);
    }
    let mut manifest = manifest;
    if let Some(stats) = image_stats {
        manifest.quantization = Some(runtime::bundle::quantization::Quantization {
            precision: "int8".into(),
            scheme: quantize::scheme(stats.weight_max, false),
            source: format!("trainer export of {}", spec.checkpoint.display()),
            image_encoder: stats,
            text_encoder: text.as_ref().and_then(|(_, s)| s.clone()),
            calibration_images: 0,
            check: None,
        });
    }
    let mut w = BundleWriter::create(out, manifest, force)?;
    w.add_file(
        bundle::IMAGE_ENCODER,
        "image_encoder.onnx",
        &image,
        Some((onnx::IMAGE_INPUT, onnx::IMAGE_OUTPUT)),
    )?;
    if let Some((text, _)) = text {
        w.add_file(
            bundle::TEXT_ENCODER,
            "text_encoder.onnx",
            &text,
            Some((onnx::TEXT_INPUT, onnx::TEXT_OUTPUT)),
        )?;
        w.add_file(bundle::TOKENIZER, "tokenizer.json", &tok_bytes, None)?;
    }
    w.add_label_embeddings(&emb)?;
    Ok(w.finish()?)
}

/// One encoder's graph in `precision`: int8 is the fp32 graph quantized (with what was quantized).
fn encoder(
    build: impl Fn(Precision) -> Result<Vec<u8>>,
    precision: Precision,
    name: &str,
) -> Result<(
    Vec<u8>,
    Option<runtime::bundle::quantization::QuantizeStats>,
)> {
    if precision != Precision::Int8 {
        return Ok((build(precision)?, None));
    }
    let (bytes, stats) = quantize::quantize_model(
        &build(Precision::Fp32)?,
        Path::new(name),
        quantize::QuantizeOptions::default(),
    )?;
    Ok((bytes, Some(stats)))
}
