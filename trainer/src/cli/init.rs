//! `trainer init`: a checkpoint folder from HF, OpenAI or open_clip weights, or random weights.

use std::path::PathBuf;

use clap::Args;
use runtime::text::tokenizer::ClipTokenizer;
use tch::Device;

use crate::error::{Error, Result};
use crate::model::ClipConfig;
use crate::weights;

#[derive(Args)]
pub struct InitArgs {
    /// HF model folder (config.json + model.safetensors [+ tokenizer.json]), OpenAI's `.pt` archive
    /// (ViT), or open_clip's `open_clip_model.safetensors` (ViT or ResNet, e.g. RN50).
    #[arg(long, conflicts_with = "config")]
    pub from: Option<PathBuf>,
    /// Random weights with a preset configuration: vit-b-32, vit-b-16, vit-l-14, rn50, small,
    /// rn-small (the UNIFESP recipe's), tiny, rn-tiny.
    #[arg(long)]
    pub config: Option<String>,
    /// Input size in pixels of the preset's image tower (a multiple of 32 for ResNets, of the patch
    /// size for ViTs) [default: the preset's].
    #[arg(long, requires = "config")]
    pub image_size: Option<i64>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// tokenizer.json to store with the checkpoint (default: the HF folder's, else OpenAI's BPE
    /// vocabulary, built in).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Checkpoint folder to write (a folder of other things: the checkpoint goes inside it).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing checkpoint at --out.
    #[arg(long)]
    pub force: bool,
}

pub fn init(a: &InitArgs) -> Result<()> {
    let (config, tensors, hf_tokenizer) = match (&a.from, &a.config) {
        (Some(from), _) if from.is_dir() => {
            let config = weights::read_config(&from.join(weights::CONFIG))?;
            (
                config,
                Some(weights::read_safetensors(from)?),
                Some(from.join("tokenizer.json")).filter(|p| p.exists()),
            )
        }
        (Some(from), _) if from.extension().is_some_and(|e| e == "safetensors") => {
            let (config, tensors) = weights::read_open_clip_safetensors(from)?;
            (config, Some(tensors), None)
        }
        (Some(from), _) => {
            let (config, tensors) = weights::read_openai_torchscript(from)?;
            (config, Some(tensors), None)
        }
        (None, Some(name)) => {
            let mut config = ClipConfig::preset(name).ok_or_else(|| {
                Error::ModelConfig(format!(
                    "unknown configuration '{name}' (presets: {})",
                    ClipConfig::PRESETS.join(", ")
                ))
            })?;
            if let Some(size) = a.image_size {
                config.vision_config.image_size = size;
                config.validate().map_err(Error::ModelConfig)?;
            }
            (config, None, None)
        }
        (None, None) => return Err(Error::Usage("give --from PATH or --config NAME".into())),
    };
    tch::manual_seed(a.seed);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _model = crate::model::Clip::new(&vs.root(), &config);
    let source = a
        .from
        .clone()
        .unwrap_or_else(|| PathBuf::from("random init"));
    if let Some(t) = tensors {
        weights::assign(&vs, t, &source)?;
    }
    let (tok_bytes, tok_path) = match a.tokenizer.clone().or(hf_tokenizer) {
        Some(p) => (std::fs::read(&p).map_err(|e| Error::io(&p, e))?, p),
        None => (
            runtime::DEFAULT_TOKENIZER.to_vec(),
            PathBuf::from(runtime::DEFAULT_TOKENIZER_NAME),
        ),
    };
    let tok = ClipTokenizer::from_bytes(&tok_bytes, &tok_path)?;
    if tok.vocab_size() as i64 > config.text_config.vocab_size {
        eprintln!(
            "notice: the tokenizer has {} tokens, the model's vocabulary {}",
            tok.vocab_size(),
            config.text_config.vocab_size
        );
    }
    let provenance = serde_json::json!({"source": source, "seed": a.seed});
    let out = runtime::fs::resolve_output(
        &a.out,
        runtime::fs::OutputKind::Checkpoint,
        || {
            a.config.clone().unwrap_or_else(|| {
                runtime::bundle::folder_name(
                    &source
                        .file_stem()
                        .map(|s| s.to_string_lossy().to_string())
                        .unwrap_or_default(),
                )
            })
        },
        a.force,
    )?;
    weights::save_checkpoint(&out, &config, &vs, |staging| {
        runtime::fs::write_atomic(&staging.join("tokenizer.json"), &tok_bytes)?;
        let json = serde_json::to_vec_pretty(&provenance).expect("json");
        Ok(runtime::fs::write_atomic(
            &staging.join("provenance.json"),
            &json,
        )?)
    })?;
    let params: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    println!(
        "wrote {} ({:.1} M parameters, from {})",
        out.display(),
        params as f64 / 1e6,
        source.display()
    );
    Ok(())
}
