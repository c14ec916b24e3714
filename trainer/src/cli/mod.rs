//! The `trainer` command line, one file per command: [`init`], [`finetune`], [`export`], [`predict`].

use clap::{Parser, Subcommand};
use tch::Device;

use crate::error::{Error, Result};

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
    /// Classify images with a checkpoint in libtorch (JSON lines, as `classify --json`).
    Predict(PredictArgs),
}

pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        "cuda" => Err(Error::Config(
            "CUDA is not available (build with --features cuda on a GPU machine)".into(),
        )),
        "auto" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        "auto" => Ok(Device::Cpu),
        other => Err(Error::Config(format!(
            "unknown device {other:?} (cpu, cuda or auto)"
        ))),
    }
}

pub(crate) fn templates_or_default(t: &[String]) -> Vec<String> {
    if t.is_empty() {
        runtime::text::prompts::default_templates()
    } else {
        t.to_vec()
    }
}
