//! `trainer export`: a checkpoint -> a model bundle.

use std::path::PathBuf;

use clap::Args;

use super::CheckpointLabels;
use crate::error::Result;
use crate::export::{self, ExportSpec};
use crate::onnx::Precision;

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub scoring: CheckpointLabels,
    /// Bundle folder to write (a folder of other things: the bundle goes inside it, named --name).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing bundle at --out.
    #[arg(long)]
    pub force: bool,
    /// fp32 (CPU default) or fp16 (for GPUs).
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    /// Name of the bundle (default: the --out folder's name, or the checkpoint's when --out is a
    /// folder of other things).
    #[arg(long)]
    pub name: Option<String>,
    /// Leave out the text encoder and tokenizer (fixed labels only).
    #[arg(long)]
    pub no_text_encoder: bool,
}

pub fn export_cmd(a: &ExportArgs) -> Result<()> {
    let labels = a.scoring.labels()?;
    let checkpoint = a.scoring.checkpoint()?;
    // The name: --name, else the --out folder's own name when the bundle goes there, else the
    // checkpoint's (when --out is a folder of other things and the bundle goes inside it).
    let becomes_out = !a.out.is_dir()
        || runtime::fs::OutputKind::Bundle.is_in(&a.out)
        || std::fs::read_dir(&a.out).is_ok_and(|mut d| d.next().is_none());
    let from = if becomes_out {
        &a.out
    } else {
        &a.scoring.checkpoint
    };
    let name = a.name.clone().unwrap_or_else(|| {
        std::fs::canonicalize(from)
            .unwrap_or_else(|_| from.clone())
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "bundle".into())
    });
    let spec = ExportSpec {
        checkpoint,
        labels,
        templates: a.scoring.templates(),
        precision: a.precision,
        name,
        description: String::new(),
        without_text_encoder: a.no_text_encoder,
        provenance: Default::default(),
    };
    let b = export::export(spec, &a.out, a.force)?;
    println!(
        "wrote {} ({} labels, {} dims, {})",
        b.dir.display(),
        b.manifest.labels.len(),
        b.manifest.embedding_dim,
        a.precision.name()
    );
    Ok(())
}
