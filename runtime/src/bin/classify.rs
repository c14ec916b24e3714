//! `classify [--model DIR] [-k K] [--json] [--labels SPEC] PATH...`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use runtime::cli::{run_main, show_path, DeviceArgs, LabelArgs, ModelArgs, ResultPrinter};
use runtime::engine::Engine;
use runtime::pipeline::{self, PipelineOptions};
use runtime::scoring;

/// Classify X-ray images (PNG, JPEG, DICOM) with an xray-clip model bundle.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Image files or folders (folders are searched recursively for PNG, JPEG and DICOM files,
    /// recognised by content; hidden folders are skipped).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// How many labels to show per image (at most the number of labels).
    #[arg(long, short = 'k', default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    top_k: u16,
    /// JSON lines instead of a table (one per file; a file that failed has "error").
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    labels: LabelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Images per encoder call.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    batch_size: u16,
}

fn main() -> ExitCode {
    run_main(|| {
        let cli = Cli::parse();
        let (files, problems) = pipeline::collect_files(&cli.paths);
        let mut failed = problems.len();
        // The width and k are only known once the labels are; errors before that need neither.
        let early = ResultPrinter::new(cli.json, 0, &[]);
        for e in &problems {
            let file = match e {
                runtime::Error::Io { path, .. } => show_path(path),
                _ => String::new(),
            };
            early.error(&file, e);
        }
        if files.is_empty() {
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
            let shown: Vec<String> = cli.paths.iter().map(|p| show_path(p)).collect();
            anyhow::bail!(
                "no image files found in {} (searched for {})",
                shown.join(", "),
                runtime::image::files::SEARCHED
            );
        }
        let bundle = cli.model.load()?;
        runtime::cli::demo_notice(&bundle);
        let mut engine = Engine::load(bundle, cli.device.options())?;
        let (labels, label_emb) = cli.labels.resolve(&mut engine)?;
        let model_name = engine.bundle.manifest.name.clone();
        let scale = engine.bundle.manifest.logit_scale;
        let k = runtime::cli::top_k(cli.top_k as usize, labels.len());
        let opts = PipelineOptions {
            batch_size: cli.batch_size as usize,
            workers: 1,
            progress: files.len() > 32 && !cli.json,
        };
        let results = pipeline::embed_files(&mut engine, &files, &opts);
        let printer = ResultPrinter::new(cli.json, k, &files);
        printer.header();
        for (path, result) in files.iter().zip(results) {
            match result {
                Ok(emb) => {
                    let probs = scoring::probabilities(&emb, &label_emb, scale);
                    printer.scores(path, &model_name, &labels, &probs);
                }
                Err(e) => {
                    failed += 1;
                    printer.error(&show_path(path), &e);
                }
            }
        }
        if failed > 0 {
            let total = files.len() + problems.len();
            if total > 1 {
                eprintln!("error: {failed} of {total} input(s) could not be classified");
            }
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })
}
