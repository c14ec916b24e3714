//! Builds a bundle from ONNX encoders made elsewhere (HF `optimum`, `torch.onnx`, this project's
//! trainer): hashes the files, computes the label embeddings with the text encoder, writes the manifest.

use std::path::{Path, PathBuf};

use crate::bundle::{
    self, Bundle, BundleLabel, BundleWriter, Manifest, Provenance, FORMAT_VERSION,
};
use crate::engine::{Encoder, EngineOptions};
use crate::error::{Error, Result};
use crate::image::preprocess::PreprocessConfig;
use crate::pipeline;
use crate::text::labels::Label;
use crate::text::tokenizer::ClipTokenizer;

pub struct AssembleSpec {
    pub name: String,
    pub description: String,
    pub image_encoder: PathBuf,
    pub text_encoder: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub labels: Vec<Label>,
    pub templates: Vec<String>,
    /// Label embeddings `[labels x dim]` for bundles without a text encoder.
    pub label_embeddings: Option<Vec<f32>>,
    pub logit_scale: f32,
    pub preprocessing: PreprocessConfig,
    pub provenance: Provenance,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// The files of a bundle-to-be, already in memory (`runtime import` makes them from an export's
/// folder, splitting or reading files as its layout needs).
pub struct AssembleInput {
    /// (ONNX bytes, name for messages)
    pub image_encoder: (Vec<u8>, String),
    pub text_encoder: Option<(Vec<u8>, String)>,
    /// (tokenizer.json bytes, name for messages); `None`: OpenAI's CLIP tokenizer (built in).
    pub tokenizer: Option<(Vec<u8>, PathBuf)>,
}

pub fn assemble(
    spec: AssembleSpec,
    out: &Path,
    force: bool,
    opts: &EngineOptions,
) -> Result<Bundle> {
    let input = AssembleInput {
        image_encoder: (
            read(&spec.image_encoder)?,
            spec.image_encoder.display().to_string(),
        ),
        text_encoder: match &spec.text_encoder {
            Some(p) => Some((read(p)?, p.display().to_string())),
            None => None,
        },
        tokenizer: match &spec.tokenizer {
            Some(p) => Some((read(p)?, p.clone())),
            None => None,
        },
    };
    assemble_from(spec, input, out, force, opts)
}

/// [`assemble`] with the files in memory (`spec`'s paths are not read).
pub fn assemble_from(
    spec: AssembleSpec,
    input: AssembleInput,
    out: &Path,
    force: bool,
    opts: &EngineOptions,
) -> Result<Bundle> {
    let (image_bytes, image_name) = input.image_encoder;
    let mut image = Encoder::from_bytes(&image_bytes, &image_name, opts, (None, None))?;
    let s = spec.preprocessing.image_size as usize;
    let (_, image_dim) = image.embed_pixels(&[1, 3, s, s], &vec![0.0; 3 * s * s])?;

    let (embeddings, dim, text) = match (input.text_encoder, &spec.label_embeddings) {
        (Some((te_bytes, te_name)), _) => {
            // Without a tokenizer: OpenAI's CLIP vocabulary, which every CLIP text encoder uses.
            let (tok_bytes, tok_path) = input.tokenizer.unwrap_or_else(|| {
                (
                    crate::DEFAULT_TOKENIZER.to_vec(),
                    PathBuf::from(crate::DEFAULT_TOKENIZER_NAME),
                )
            });
            let tokenizer = ClipTokenizer::from_bytes(&tok_bytes, &tok_path)?;
            let mut text = Encoder::from_bytes(&te_bytes, &te_name, opts, (None, None))?;
            let (emb, dim) =
                pipeline::prompt_embeddings(&mut text, &tokenizer, &spec.labels, &spec.templates)?;
            let names = (
                text.input_name().to_string(),
                text.output_name().to_string(),
            );
            (emb, dim, Some((te_bytes, tok_bytes, names)))
        }
        (None, Some(emb)) => (emb.clone(), image_dim, None),
        (None, None) => {
            return Err(Error::Import(
                "give a text encoder or precomputed label embeddings".into(),
            ))
        }
    };
    if dim != image_dim {
        return Err(Error::Shape {
            what: "encoders".into(),
            expected: format!("text embedding size = image embedding size ({image_dim})"),
            actual: dim.to_string(),
        });
    }
    let labels = BundleLabel::fill_all(&spec.labels, &spec.templates)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: spec.name,
        description: spec.description,
        labels,
        templates: spec.templates,
        embedding_dim: dim,
        logit_scale: spec.logit_scale,
        image_embeds_normalized: false,
        preprocessing: spec.preprocessing,
        files: Default::default(),
        provenance: spec.provenance,
        quantization: None,
        self_check: None,
        calibration: None,
    };
    let (img_in, img_out) = (
        image.input_name().to_string(),
        image.output_name().to_string(),
    );
    let mut w = BundleWriter::create(out, manifest, force)?;
    w.add_file(
        bundle::IMAGE_ENCODER,
        "image_encoder.onnx",
        &image_bytes,
        Some((&img_in, &img_out)),
    )?;
    if let Some((te_bytes, tok_bytes, (te_in, te_out))) = text {
        w.add_file(
            bundle::TEXT_ENCODER,
            "text_encoder.onnx",
            &te_bytes,
            Some((&te_in, &te_out)),
        )?;
        w.add_file(bundle::TOKENIZER, "tokenizer.json", &tok_bytes, None)?;
    }
    w.add_label_embeddings(&embeddings)?;
    w.finish()
}
