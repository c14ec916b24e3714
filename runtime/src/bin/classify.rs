//! `classify [--model DIR] [--top-k K] [--json] [--labels "a,b" | --labels-file F] PATH...`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use runtime::cli::{run_main, show_path, DeviceArgs, LabelArgs, ModelArgs};
use runtime::engine::Engine;
use runtime::pipeline::{self, PipelineOptions};
use runtime::scoring;

/// Classify X-ray images (PNG, JPEG, DICOM) with an xray-clip model bundle.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Image files or folders (searched recursively for .png, .jpg, .jpeg, .dcm, .dicom).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// How many labels to show per image.
    #[arg(long, short = 'k', default_value_t = 3)]
    top_k: usize,
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    labels: LabelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Images per encoder call.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

fn main() -> ExitCode {
    run_main(|| {
        let cli = Cli::parse();
        let files = pipeline::collect_files(&cli.paths)?;
        if files.is_empty() {
            anyhow::bail!("no image files found in {:?}", cli.paths);
        }
        let bundle = cli.model.load()?;
        let mut engine = Engine::load(bundle, cli.device.options())?;
        let (labels, label_emb) = cli.labels.resolve(&mut engine)?;
        let scale = engine.bundle.manifest.logit_scale;
        let opts = PipelineOptions {
            batch_size: cli.batch_size,
            workers: 1,
            progress: files.len() > 32 && !cli.json,
        };
        let results = pipeline::embed_files(&mut engine, &files, &opts);
        let k = cli.top_k.clamp(1, labels.len());
        let mut failed = 0;
        let width = files
            .iter()
            .map(|f| show_path(f).chars().count())
            .max()
            .unwrap_or(0)
            .max(4);
        if !cli.json {
            println!(
                "{:<width$}  {}",
                "file",
                (1..=k)
                    .map(|i| format!("{:<28}", format!("top-{i}")))
                    .collect::<String>()
                    .trim_end()
            );
        }
        for (path, result) in files.iter().zip(results) {
            match result {
                Ok(emb) => {
                    let probs = scoring::probabilities(&emb, &label_emb, scale);
                    if cli.json {
                        println!(
                            "{}",
                            scoring::json_line(&show_path(path), &labels, &probs, k)
                        );
                    } else {
                        let top = scoring::top_k(&probs, k);
                        let cells: String = top
                            .iter()
                            .map(|&i| {
                                format!("{:<28}", format!("{} {:.4}", labels[i].name, probs[i]))
                            })
                            .collect();
                        println!("{:<width$}  {}", show_path(path), cells.trim_end());
                    }
                }
                Err(e) => {
                    failed += 1;
                    if cli.json {
                        println!(
                            "{}",
                            serde_json::json!({"file": show_path(path), "error": e.to_string()})
                        );
                    }
                    eprintln!("error: {e}");
                }
            }
        }
        if failed > 0 {
            if files.len() > 1 {
                eprintln!(
                    "error: {failed} of {} file(s) could not be classified",
                    files.len()
                );
            }
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })
}
