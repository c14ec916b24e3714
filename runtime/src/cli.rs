//! Pieces shared by the `classify` and `runtime` binaries (and the trainer's): one-line errors,
//! model and label options, device options.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::bundle::Bundle;
use crate::engine::{Device, Engine, EngineOptions};
use crate::labels::{self, Label};
use crate::pipeline;

/// Runs a binary's body; any error becomes `error: ...` on one line and exit code 1.
pub fn run_main(body: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode {
    // Piped into `head`: end quietly when the reader goes away, as other Unix tools do, instead of
    // panicking on the failed write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match body() {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let mut line = String::new();
            for part in chain {
                // Error sources often repeat the outer message; print each new part once.
                if !line.contains(&part) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&part);
                }
            }
            eprintln!("error: {}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model bundle folder (default: $XRAY_CLIP_MODEL, else the embedded models/default).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
}

impl ModelArgs {
    pub fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(crate::default_model_dir)
    }

    pub fn load(&self) -> anyhow::Result<Bundle> {
        Ok(Bundle::load(&self.dir())?)
    }
}

#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// cpu, cuda or auto (CUDA when available, else CPU).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Intra-op threads for ONNX Runtime (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl DeviceArgs {
    pub fn options(&self) -> EngineOptions {
        EngineOptions {
            device: self.device,
            threads: self.threads,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct LabelArgs {
    /// Custom labels, comma-separated (needs a bundle with a text encoder).
    #[arg(long, conflicts_with = "labels_file")]
    pub labels: Option<String>,
    /// Custom labels, one per line.
    #[arg(long)]
    pub labels_file: Option<PathBuf>,
    /// Prompt template(s) for custom labels, `{}` = label (default: the bundle's templates).
    #[arg(long = "template")]
    pub templates: Vec<String>,
}

impl LabelArgs {
    /// Custom labels if any were given (`unifesp` and `irma` name the built-in sets).
    pub fn custom(&self) -> anyhow::Result<Option<Vec<Label>>> {
        if let Some(list) = &self.labels {
            if let Some(set) = labels::builtin(list.trim()) {
                return Ok(Some(set));
            }
            return Ok(Some(labels::from_list(list.split(','))?));
        }
        if let Some(path) = &self.labels_file {
            let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
            return Ok(Some(labels::from_list(text.lines())?));
        }
        Ok(None)
    }

    /// The labels and their normalised embeddings: the bundle's, or custom ones encoded now.
    pub fn resolve(&self, engine: &mut Engine) -> anyhow::Result<(Vec<Label>, Vec<f32>)> {
        match self.custom()? {
            None => {
                if !self.templates.is_empty() {
                    let labels: Vec<Label> = engine.bundle.labels().into_iter().cloned().collect();
                    let emb = pipeline::text_label_embeddings(engine, &labels, &self.templates)?;
                    return Ok((labels, emb));
                }
                let labels = engine.bundle.labels().into_iter().cloned().collect();
                Ok((labels, engine.bundle.label_embeddings.clone()))
            }
            Some(labels) => {
                let templates = if self.templates.is_empty() {
                    engine.bundle.manifest.templates.clone()
                } else {
                    self.templates.clone()
                };
                let emb = pipeline::text_label_embeddings(engine, &labels, &templates)?;
                Ok((labels, emb))
            }
        }
    }
}

/// Display form of a path for tables: relative paths stay as given.
pub fn show_path(p: &Path) -> String {
    p.display().to_string()
}
