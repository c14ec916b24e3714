//! `classify [--model DIR] [-k K] [--json] [--labels SPEC] PATH...`

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use runtime::cli::{run_main, show_path, BatchArgs, DeviceArgs, LabelArgs, ModelArgs};
use runtime::engine::Engine;
use runtime::fs::{StreamMode, StreamedFile};
use runtime::image::files::{self, Listed};
use runtime::pipeline;
use runtime::scoring;
use runtime::selection::{DoneSet, Shard};

/// Classify X-ray images (PNG, JPEG, DICOM) with an xray-clip model bundle. Results are printed
/// batch by batch, in input order, as they are ready.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Image files or folders (folders are searched recursively for PNG, JPEG and DICOM files,
    /// recognised by content; hidden folders are skipped).
    #[arg(required_unless_present = "files_from")]
    paths: Vec<PathBuf>,
    /// Also read paths (files or folders) from this file, one per line; `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    files_from: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// How many labels to show per image (at most the number of labels).
    #[arg(long, short = 'k', default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    top_k: u16,
    /// JSON lines instead of a table (one per file; a file that failed has "error"; with a
    /// calibrated bundle, "unknown": true when the top label is below its threshold).
    #[arg(long)]
    json: bool,
    /// Show the top label even where the bundle's calibration answers "unknown" (the calibrated
    /// probabilities stay).
    #[arg(long)]
    no_reject: bool,
    #[command(flatten)]
    labels: LabelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    batch: BatchArgs,
    /// Take only shard K of N (1 <= K <= N): each file belongs to one shard by a hash of its path,
    /// so N jobs given the same inputs split them with no coordination.
    #[arg(long, value_name = "K/N")]
    shard: Option<Shard>,
    /// Skip the files that already have a result in this file of JSON lines (an earlier
    /// `classify --json`, e.g. a killed run's --out; a file that does not exist yet skips
    /// nothing). Paths are compared as printed: give the inputs the same way.
    #[arg(long, value_name = "OUT.jsonl")]
    skip_done: Option<PathBuf>,
    /// Write the results to this file instead of stdout (a new file; with --skip-done naming it,
    /// appended to; replaced with --force).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Replace an existing --out file (the old one stays until the new one is complete).
    #[arg(long)]
    force: bool,
}

/// Where the results go.
enum Output {
    Stdout(std::io::Stdout),
    File(StreamedFile),
}

impl std::io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::Stdout(s) => s.write(buf),
            Output::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::Stdout(s) => s.flush(),
            Output::File(f) => f.flush(),
        }
    }
}

fn open_output(cli: &Cli) -> anyhow::Result<Output> {
    let Some(out) = &cli.out else {
        return Ok(Output::Stdout(std::io::stdout()));
    };
    let continues = cli
        .skip_done
        .as_deref()
        .is_some_and(|done| same_file(done, out));
    let mode = if continues {
        StreamMode::Append
    } else if cli.force && out.exists() {
        StreamMode::Replace
    } else {
        StreamMode::Create
    };
    Ok(Output::File(StreamedFile::open(out, mode)?))
}

/// Whether two paths name one file (the second may not exist yet).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn main() -> ExitCode {
    run_main(|| {
        let cli = Cli::parse();
        if cli.skip_done.is_some() && !cli.json {
            anyhow::bail!("--skip-done reads and continues JSON lines: pass --json as well");
        }
        let done = match &cli.skip_done {
            Some(f) => DoneSet::read(f)?,
            None => DoneSet::default(),
        };
        let bundle = cli.model.load()?;
        let mut engine = Engine::load(bundle, cli.device.options())?;
        let (labels, label_emb) = cli.labels.resolve(&mut engine)?;
        let model_name = engine.bundle.manifest.name.clone();
        // The bundle's calibration holds for its own labels only.
        let own_labels = cli.labels.labels.is_none() && cli.labels.templates.is_empty();
        let manifest = &engine.bundle.manifest;
        let (scale, reject) = if own_labels {
            let reject = engine.bundle.reject_rule().filter(|_| !cli.no_reject);
            (manifest.calibrated_logit_scale(), reject)
        } else {
            (manifest.logit_scale, None)
        };
        let k = runtime::cli::top_k(cli.top_k as usize, labels.len());
        let output = open_output(&cli)?;
        let out_name = cli
            .out
            .as_deref()
            .map_or_else(|| "stdout".to_string(), show_path);
        let mut printer = runtime::cli::ResultPrinter::to(cli.json, k, output);
        printer.reject = reject;
        let (listed, skipped) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let listing = || {
            let given = files::list(cli.paths.clone());
            let from_file: Box<dyn Iterator<Item = Listed>> = match &cli.files_from {
                None => Box::new(std::iter::empty()),
                Some(f) if f.as_os_str() == "-" => Box::new(files::list_lines(
                    std::io::stdin().lock(),
                    PathBuf::from("<stdin>"),
                )),
                Some(f) => match std::fs::File::open(f) {
                    Ok(file) => {
                        Box::new(files::list_lines(std::io::BufReader::new(file), f.clone()))
                    }
                    Err(e) => Box::new(std::iter::once(Err(Box::new((
                        f.clone(),
                        runtime::Error::io(f, e),
                    ))))),
                },
            };
            given.chain(from_file).filter(|item| {
                let path = match item {
                    Ok(p) => p,
                    Err(unlisted) => &unlisted.0,
                };
                if cli.shard.is_some_and(|s| !s.contains(path)) {
                    return false;
                }
                listed.fetch_add(1, Ordering::Relaxed);
                let take = item.is_err() || !done.contains(path);
                if !take {
                    skipped.fetch_add(1, Ordering::Relaxed);
                }
                take
            })
        };
        let opts = cli.batch.pipeline(!cli.json || cli.out.is_some());
        let mut failed = 0usize;
        // Said once, with the first result: not for inputs that turn out to hold no image.
        let mut demo_notice = runtime::cli::demo_notice_line(&engine.bundle);
        let write_error = |e| runtime::Error::io(&out_name, e);
        pipeline::embed_stream(&mut engine, listing, &opts, |batch| {
            printer.widen(batch.iter().map(|(p, _)| p.as_path()));
            for (path, result) in batch {
                match result {
                    Ok(emb) => {
                        if let Some(line) = demo_notice.take() {
                            eprintln!("{line}");
                        }
                        let probs = scoring::probabilities(&emb, &label_emb, scale);
                        printer
                            .scores(&path, &model_name, &labels, &emb, &probs)
                            .map_err(write_error)?;
                    }
                    Err(e) => {
                        failed += 1;
                        printer.error(&show_path(&path), &e).map_err(write_error)?;
                    }
                }
            }
            printer.flush().map_err(write_error)
        })?;
        if let Output::File(f) = printer.into_inner() {
            f.finish()?;
        }
        let (listed, skipped) = (listed.into_inner(), skipped.into_inner());
        if listed == 0 {
            let mut shown: Vec<String> = cli.paths.iter().map(|p| show_path(p)).collect();
            shown.extend(
                cli.files_from
                    .iter()
                    .map(|f| format!("--files-from {}", f.display())),
            );
            match cli.shard {
                Some(s) => eprintln!("note: no input falls in shard {s}"),
                None => anyhow::bail!(
                    "no image files found in {} (searched for {})",
                    shown.join(", "),
                    files::SEARCHED
                ),
            }
        }
        if skipped > 0 {
            eprintln!(
                "note: skipped {skipped} of {listed} file(s) with a result already (--skip-done)"
            );
        }
        if failed > 0 {
            if listed > 1 {
                eprintln!("error: {failed} of {listed} input(s) could not be classified");
            }
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })
}
