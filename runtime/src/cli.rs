//! Pieces shared by the `classify` and `runtime` binaries (and the trainer's): one-line errors,
//! model and label options, device options.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::bundle::Bundle;
use crate::engine::{Device, Engine, EngineOptions};
use crate::pipeline;
use crate::text::labels::{self, Label};

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
            // The toolkit's errors end their message with their cause and do not repeat it as a
            // `source()`, so the chain has each part once.
            let line = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model bundle folder (default: $XRAY_CLIP_MODEL, else the built-in demonstration bundle).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Bundle> {
        Ok(match &self.model {
            Some(dir) => Bundle::load(dir)?,
            None => load_default()?,
        })
    }
}

/// The bundle used without `--model`: `XRAY_CLIP_MODEL`, else the built-in one.
pub fn load_default() -> anyhow::Result<Bundle> {
    Ok(match crate::default_model() {
        crate::DefaultModel::FromEnv(dir) => Bundle::load(&dir).map_err(|e| {
            anyhow::anyhow!(
                "XRAY_CLIP_MODEL={}: {e} (unset it to use the built-in model)",
                dir.display()
            )
        })?,
        crate::DefaultModel::BuiltIn => Bundle::from_embedded(crate::DEFAULT_BUNDLE)?,
    })
}

/// One line on stderr when the demonstration bundle is in use, naming all that it knows.
pub fn demo_notice(bundle: &Bundle) {
    if let Some(line) = demo_notice_line(bundle) {
        eprintln!("{line}");
    }
}

/// The line of [`demo_notice`], for a caller that says it later.
pub fn demo_notice_line(bundle: &Bundle) -> Option<String> {
    (bundle.manifest.name == DEMO_BUNDLE_NAME).then(|| {
        let names: Vec<&str> = bundle.labels().iter().map(|l| l.name.as_str()).collect();
        format!(
            "note: {} is a demonstration model that knows only {} classes ({}); any other image gets one of them. Pass --model for a real bundle (README: \"Get a real model\").",
            bundle.manifest.name,
            names.len(),
            names.join(", ")
        )
    })
}

/// Manifest name of the demonstration bundle in `models/default`.
pub const DEMO_BUNDLE_NAME: &str = "xray-clip-default-mednist";

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
    /// Custom labels: a built-in set (unifesp, irma, irma-reference), a file with one label per
    /// line, or a comma-separated list (needs a bundle with a text encoder).
    #[arg(long)]
    pub labels: Option<String>,
    /// Prompt template(s) for custom labels, `{}` = label (default: the bundle's templates).
    #[arg(long = "template")]
    pub templates: Vec<String>,
}

impl LabelArgs {
    /// Custom labels if any were given.
    pub fn custom(&self) -> anyhow::Result<Option<Vec<Label>>> {
        Ok(match &self.labels {
            Some(spec) => Some(labels::parse_spec(spec)?),
            None => None,
        })
    }

    /// The labels and their normalised embeddings: the bundle's, or custom ones encoded now.
    pub fn resolve(&self, engine: &mut Engine) -> anyhow::Result<(Vec<Label>, Vec<f32>)> {
        let custom = self.custom()?;
        if custom.is_none() && self.templates.is_empty() {
            let labels = engine.bundle.labels().into_iter().cloned().collect();
            return Ok((labels, engine.bundle.label_embeddings.clone()));
        }
        if !engine.bundle.has_text_encoder() {
            anyhow::bail!(
                "{} has no text encoder, so it scores only its own {} labels: drop --labels/--template, or use a bundle with a text encoder (trainer export, or runtime assemble --text-encoder)",
                engine.bundle.dir.display(),
                engine.bundle.manifest.labels.len()
            );
        }
        let labels =
            custom.unwrap_or_else(|| engine.bundle.labels().into_iter().cloned().collect());
        let templates = if self.templates.is_empty() {
            engine.bundle.manifest.templates.clone()
        } else {
            self.templates.clone()
        };
        let emb = pipeline::text_label_embeddings(engine, &labels, &templates)?;
        Ok((labels, emb))
    }
}

/// Display form of a path for tables: relative paths stay as given.
pub fn show_path(p: &Path) -> String {
    p.display().to_string()
}

/// How many labels to show per image: `-k` above the number of labels is said once, then all are
/// shown (`classify`, `trainer predict`).
pub fn top_k(requested: usize, labels: usize) -> usize {
    if requested > labels {
        eprintln!("note: -k {requested} is more than the {labels} labels; showing {labels}");
    }
    requested.min(labels)
}

/// Images per encoder call and decoder threads (`classify`, `runtime eval`).
#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// Images per encoder call.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// Threads that decode and preprocess images beside the encoder [default: one per core].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,
}

impl BatchArgs {
    pub fn pipeline(&self, progress: bool) -> pipeline::PipelineOptions {
        pipeline::PipelineOptions {
            batch_size: self.batch_size as usize,
            workers: self
                .workers
                .map_or_else(pipeline::default_workers, |w| w as usize),
            progress,
        }
    }
}

/// Prints one line per image, as `classify` does: a table (file, then the `k` best labels and
/// their probabilities), or JSON lines with `--json` (a file that failed gets `"error"`), to
/// stdout or a file. The table's file column is as wide as the longest name seen so far (results
/// are printed as they come).
pub struct ResultPrinter<W: std::io::Write = std::io::Stdout> {
    pub json: bool,
    pub k: usize,
    /// Width of the file column.
    pub width: usize,
    /// The bundle's "unknown" rule (a calibrated bundle scored on its own labels).
    pub reject: Option<crate::calibration::RejectRule>,
    out: W,
    header_done: bool,
}

impl ResultPrinter {
    /// To stdout, the file column as wide as the longest of `files`.
    pub fn new(json: bool, k: usize, files: &[PathBuf]) -> ResultPrinter {
        let mut p = ResultPrinter::to(json, k, std::io::stdout());
        p.widen(files.iter().map(PathBuf::as_path));
        p
    }
}

impl<W: std::io::Write> ResultPrinter<W> {
    pub fn to(json: bool, k: usize, out: W) -> ResultPrinter<W> {
        ResultPrinter {
            json,
            k,
            width: 4,
            reject: None,
            out,
            header_done: false,
        }
    }

    /// Makes the file column at least as wide as these names.
    pub fn widen<'a>(&mut self, files: impl Iterator<Item = &'a Path>) {
        for f in files {
            self.width = self.width.max(show_path(f).chars().count());
        }
    }

    /// The table's header line, once, before the first row (nothing for JSON).
    fn header(&mut self) -> std::io::Result<()> {
        if self.json || self.header_done {
            return Ok(());
        }
        self.header_done = true;
        writeln!(
            self.out,
            "{:<width$}  {}",
            "file",
            (1..=self.k)
                .map(|i| format!("{:<28}", format!("top-{i}")))
                .collect::<String>()
                .trim_end(),
            width = self.width
        )
    }

    pub fn scores(
        &mut self,
        file: &Path,
        model: &str,
        labels: &[Label],
        embedding: &[f32],
        probs: &[f32],
    ) -> std::io::Result<()> {
        let mut line = crate::scoring::json_line(&show_path(file), model, labels, probs, self.k);
        let unknown =
            crate::calibration::mark_unknown(&mut line, embedding, probs, self.reject.as_ref());
        if self.json {
            return writeln!(self.out, "{line}");
        }
        self.header()?;
        let mut cells: String = crate::scoring::top_k(probs, self.k)
            .iter()
            .map(|&i| format!("{:<28}", format!("{} {:.4}", labels[i].name, probs[i])))
            .collect();
        if let Some(rule) = self.reject.as_ref().filter(|_| unknown) {
            cells = format!(
                "unknown ({} {:.4} < {:.4}): {cells}",
                rule.score.short_name(),
                line["reject_score"].as_f64().unwrap_or(f64::NAN),
                rule.below
            );
        }
        writeln!(
            self.out,
            "{:<width$}  {}",
            show_path(file),
            cells.trim_end(),
            width = self.width
        )
    }

    /// A file that could not be classified: on stderr, and as a JSON line with `--json`.
    pub fn error(&mut self, file: &str, e: &dyn std::fmt::Display) -> std::io::Result<()> {
        eprintln!("error: {e}");
        if self.json {
            writeln!(
                self.out,
                "{}",
                serde_json::json!({"file": file, "error": e.to_string()})
            )?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// The output, to finish it.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Where a data set comes from (`runtime eval`, `trainer finetune`).
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Data folder in the layout of --dataset (default: $XRAY_CLIP_DATA/<dataset>, else
    /// ./data/<dataset>). For irma also the codes CSV itself (images found beside it).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// IRMA: the codes file to use when the folder holds several (default: the *train* one).
    #[arg(long)]
    pub codes: Option<PathBuf>,
    /// IRMA labels: regions (the 15 body regions of the anatomical axis, default) or reference
    /// (exactly as the reference experiment's code derived them, to compare with its figures).
    #[arg(long, default_value = "regions")]
    pub irma_labels: crate::eval::datasets::IrmaLabels,
}

impl DataArgs {
    pub fn dir(&self, kind: crate::eval::datasets::DatasetKind) -> crate::Result<PathBuf> {
        match &self.data {
            Some(d) => Ok(d.clone()),
            None => crate::eval::datasets::default_data_dir(kind),
        }
    }

    /// Loads the data set; rows with problems are reported on stderr (20 at most), not fatal.
    pub fn load(
        &self,
        kind: crate::eval::datasets::DatasetKind,
    ) -> crate::Result<crate::eval::datasets::Dataset> {
        let dir = self.dir(kind)?;
        let opts = crate::eval::datasets::LoadOptions {
            irma_labels: self.irma_labels,
            codes: self.codes.clone(),
        };
        let ds = crate::eval::datasets::load_with(kind, &dir, &opts)?;
        for p in ds.problems.iter().take(20) {
            eprintln!("warning: {p}");
        }
        if ds.problems.len() > 20 {
            eprintln!(
                "warning: ... and {} more rows with problems",
                ds.problems.len() - 20
            );
        }
        Ok(ds)
    }
}

/// The bundle `runtime eval` uses without `--model`: `XRAY_CLIP_MODEL`; else the first bundle in
/// `./models/` whose labels are the data set's; else the built-in one if it has them. `None`
/// with the reason when none fits.
pub fn find_bundle_for(labels: &[Label]) -> std::result::Result<Bundle, String> {
    if let crate::DefaultModel::FromEnv(_) = crate::default_model() {
        return load_default().map_err(|e| e.to_string());
    }
    let mut looked = Vec::new();
    if let Ok(entries) = std::fs::read_dir("models") {
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(crate::bundle::MANIFEST).is_file())
            .collect();
        dirs.sort();
        for d in dirs {
            if let Ok(b) = Bundle::load(&d) {
                if labels::match_labels(&b.labels(), labels).is_some() {
                    eprintln!("using {} (its labels are the data set's)", d.display());
                    return Ok(b);
                }
            }
            looked.push(d.display().to_string());
        }
    }
    let builtin = load_default().map_err(|e| e.to_string())?;
    if labels::match_labels(&builtin.labels(), labels).is_some() {
        return Ok(builtin);
    }
    looked.push(builtin.dir.display().to_string());
    Err(format!(
        "no bundle with the data set's labels ({}) among {}; make one from a bundle with a text encoder: runtime prompts --model BUNDLE --labels SET --out models/NAME, or pass --model BUNDLE --template \"a X-Ray image of {{}} part\" (README: \"Get a real model\")",
        labels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", "),
        looked.join(", ")
    ))
}
