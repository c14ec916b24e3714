//! `trainer predict`: classify images with a checkpoint in libtorch.

use std::path::PathBuf;

use clap::Args;
use runtime::cli::{show_path, ResultPrinter};
use runtime::text::tokenizer::ClipTokenizer;
use tch::Device;

use super::CheckpointLabels;
use crate::error::{Error, Result};
use crate::export::{self};
use crate::weights;
use crate::zero_shot;

#[derive(Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub scoring: CheckpointLabels,
    /// How many labels to show per image (at most the number of labels).
    #[arg(long, short = 'k', default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    pub top_k: u16,
    /// JSON lines instead of a table (one per file; a file that failed has "error"), as `classify`.
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda or auto (CUDA when libtorch sees a GPU, else CPU).
    #[arg(long, value_enum, default_value_t = runtime::engine::Device::Auto)]
    pub device: runtime::engine::Device,
    /// Image files or folders.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub fn predict(a: &PredictArgs) -> Result<bool> {
    let labels = a.scoring.labels()?;
    let device = crate::device::resolve(a.device)?;
    let checkpoint = a.scoring.checkpoint()?;
    let loaded = weights::load(&checkpoint, device)?;
    let (tok_bytes, tok_path) = export::checkpoint_tokenizer(&checkpoint)?;
    let tokenizer = ClipTokenizer::from_bytes(&tok_bytes, &tok_path)?;
    let per_template = zero_shot::template_tokens(
        &tokenizer,
        &labels,
        &a.scoring.templates(),
        &loaded.model.config.text_config,
        device,
    )?;
    let emb = zero_shot::label_embeddings(&loaded.model, &per_template);
    let scale = loaded.model.logit_scale.exp().double_value(&[]);
    let cfg = loaded.model.config.vision_config.preprocessing();
    let (files, problems) = runtime::pipeline::collect_files(&a.paths);
    let k = runtime::cli::top_k(a.top_k as usize, labels.len());
    let mut printer = ResultPrinter::new(a.json, k, &files);
    let stdout = |e| Error::io("stdout", e);
    let mut ok = problems.is_empty();
    for e in &problems {
        printer.error("", e).map_err(stdout)?;
    }
    let model_name = checkpoint.display().to_string();
    for f in &files {
        let pixels = match runtime::pipeline::load_tensor(f, &cfg) {
            Ok(p) => p,
            Err(e) => {
                ok = false;
                printer.error(&show_path(f), &e).map_err(stdout)?;
                continue;
            }
        };
        let x = tch::Tensor::from_slice(&pixels)
            .view([1, 3, cfg.image_size as i64, cfg.image_size as i64])
            .to_device(device);
        let probs = tch::no_grad(|| {
            let img = crate::model::normalize(&loaded.model.image_features(&x));
            (img.matmul(&emb.tr()) * scale)
                .softmax(-1, tch::Kind::Float)
                .to_device(Device::Cpu)
        });
        let probs: Vec<f32> = Vec::<f32>::try_from(probs.reshape([-1])).map_err(Error::Torch)?;
        printer
            .scores(f, &model_name, &labels, &[], &probs)
            .map_err(stdout)?;
    }
    printer.flush().map_err(stdout)?;
    Ok(ok)
}
