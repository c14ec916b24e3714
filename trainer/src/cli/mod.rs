//! The `trainer` command line, one file per command: [`init`], [`finetune`], [`export`], [`predict`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use runtime::text::labels::Label;

use crate::error::Result;

pub mod export;
pub mod finetune;
pub mod init;
pub mod predict;

pub use export::{export_cmd, ExportArgs};
pub use finetune::{finetune, FinetuneArgs};
pub use init::{init, InitArgs};
pub use predict::{predict, PredictArgs};

#[derive(Parser)]
#[command(
    version,
    about = "Fine-tune CLIP on labelled X-rays and export xray-clip bundles"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Make a checkpoint folder: from HF weights, OpenAI's TorchScript archive, or random weights.
    Init(InitArgs),
    /// Fine-tune a checkpoint on a data set (image and text encoders jointly).
    Finetune(Box<FinetuneArgs>),
    /// Export a checkpoint as a model bundle (ONNX encoders, label embeddings, tokenizer, manifest).
    Export(ExportArgs),
    /// Classify images with a checkpoint in libtorch (the table of `classify`, or `--json`).
    Predict(PredictArgs),
}

/// A checkpoint and the labels to score with it (`export`, `predict`).
#[derive(Args)]
pub struct CheckpointLabels {
    /// Model: a checkpoint folder (`trainer init`, a run's checkpoints/epoch-N) or a run folder
    /// (its selected checkpoint). `--checkpoint` is the older name.
    #[arg(long = "model", visible_alias = "checkpoint", value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Labels: a built-in set (unifesp, irma, irma-reference), a file with one label per line, or
    /// a comma-separated list.
    #[arg(long)]
    pub labels: String,
    /// Prompt template(s), `{}` = label; several are averaged.
    #[arg(long = "template")]
    pub templates: Vec<String>,
}

impl CheckpointLabels {
    /// The checkpoint folder (a run folder means its selected checkpoint).
    pub fn checkpoint(&self) -> Result<PathBuf> {
        crate::weights::resolve_checkpoint(&self.checkpoint)
    }

    pub fn labels(&self) -> Result<Vec<Label>> {
        Ok(runtime::text::labels::parse_spec(&self.labels)?)
    }

    /// The templates given, else the default one.
    pub fn templates(&self) -> Vec<String> {
        if self.templates.is_empty() {
            runtime::text::prompts::default_templates()
        } else {
            self.templates.clone()
        }
    }
}
