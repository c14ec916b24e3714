//! `trainer predict`: classify images with a checkpoint in libtorch.

use std::path::PathBuf;

use clap::Args;
use runtime::image::preprocess::PreprocessConfig;
use runtime::text::tokenizer::ClipTokenizer;
use tch::Device;

use super::templates_or_default;
use crate::error::{Error, Result};
use crate::export::{self};
use crate::weights;
use crate::zero_shot;

#[derive(Args)]
pub struct PredictArgs {
    /// Checkpoint folder (`trainer init`, or a run's checkpoints/epoch-N).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Labels: a built-in set (unifesp, irma, irma-reference), a file with one label per line, or
    /// a comma-separated list.
    #[arg(long)]
    pub labels: String,
    /// Prompt template(s), `{}` = label; several are averaged.
    #[arg(long = "template")]
    pub templates: Vec<String>,
    /// How many labels to show per image.
    #[arg(long, short = 'k', default_value_t = 3)]
    pub top_k: usize,
    /// Image files or folders.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub fn predict(a: &PredictArgs) -> Result<bool> {
    let labels = runtime::text::labels::parse_spec(&a.labels)?;
    let loaded = weights::load(&a.checkpoint, Device::Cpu)?;
    let (tok_bytes, tok_path) = export::checkpoint_tokenizer(&a.checkpoint)?;
    let tokenizer = ClipTokenizer::from_bytes(&tok_bytes, &tok_path)?;
    let per_template = templates_or_default(&a.templates)
        .iter()
        .map(|t| {
            zero_shot::label_tokens(
                &tokenizer,
                &labels,
                t,
                &loaded.model.config.text_config,
                Device::Cpu,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let emb = zero_shot::label_embeddings(&loaded.model, &per_template);
    let scale = loaded.model.logit_scale.exp().double_value(&[]);
    let s = loaded.model.config.vision_config.image_size as u32;
    let cfg = PreprocessConfig {
        image_size: s,
        resize_shortest_edge: s,
        ..PreprocessConfig::default()
    };
    let (files, problems) = runtime::pipeline::collect_files(&a.paths);
    let mut ok = problems.is_empty();
    for e in &problems {
        eprintln!("error: {e}");
    }
    let model_name = a.checkpoint.display().to_string();
    for f in &files {
        let pixels = match runtime::pipeline::load_tensor(f, &cfg) {
            Ok(p) => p,
            Err(e) => {
                ok = false;
                eprintln!("error: {e}");
                continue;
            }
        };
        let x = tch::Tensor::from_slice(&pixels).view([1, 3, s as i64, s as i64]);
        let probs = tch::no_grad(|| {
            let img = crate::model::normalize(&loaded.model.image_features(&x));
            (img.matmul(&emb.tr()) * scale).softmax(-1, tch::Kind::Float)
        });
        let probs: Vec<f32> = Vec::<f32>::try_from(probs.reshape([-1])).map_err(Error::Torch)?;
        let k = a.top_k.clamp(1, labels.len());
        println!(
            "{}",
            runtime::scoring::json_line(&f.display().to_string(), &model_name, &labels, &probs, k)
        );
    }
    Ok(ok)
}
