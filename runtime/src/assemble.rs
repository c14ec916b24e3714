//! Builds a bundle from ONNX encoders made elsewhere (HF `optimum`, `torch.onnx`, this project's
//! trainer): hashes the files, computes the label embeddings with the text encoder, writes the manifest.

use std::path::{Path, PathBuf};

use crate::bundle::{
    self, Bundle, BundleLabel, BundleWriter, Manifest, Provenance, FORMAT_VERSION,
};
use crate::engine::{Encoder, EngineOptions};
use crate::error::{Error, Result};
use crate::labels::Label;
use crate::pipeline;
use crate::preprocess::PreprocessConfig;
use crate::tokenizer::ClipTokenizer;

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

pub fn assemble(spec: AssembleSpec, out: &Path, opts: &EngineOptions) -> Result<Bundle> {
    let image_bytes = read(&spec.image_encoder)?;
    let mut image = Encoder::from_bytes(
        &image_bytes,
        &spec.image_encoder.display().to_string(),
        opts,
        (None, None),
    )?;
    let s = spec.preprocessing.image_size as usize;
    let (_, image_dim) = image.embed_pixels(&[1, 3, s, s], &vec![0.0; 3 * s * s])?;

    let (embeddings, dim, text) = match (&spec.text_encoder, &spec.label_embeddings) {
        (Some(te), _) => {
            let tok_path = spec.tokenizer.as_ref().ok_or_else(|| {
                Error::InvalidArgument("a text encoder needs a tokenizer.json".into())
            })?;
            let tok_bytes = read(tok_path)?;
            let tokenizer = ClipTokenizer::from_bytes(&tok_bytes, tok_path)?;
            let te_bytes = read(te)?;
            let mut text =
                Encoder::from_bytes(&te_bytes, &te.display().to_string(), opts, (None, None))?;
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
            return Err(Error::InvalidArgument(
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
    };
    let (img_in, img_out) = (
        image.input_name().to_string(),
        image.output_name().to_string(),
    );
    let mut w = BundleWriter::new(out, manifest)?;
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
