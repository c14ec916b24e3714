//! `runtime info | tokenize | preprocess | assemble | import | eval | prompts`: inspect, build, evaluate
//! and adjust model bundles.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use runtime::bundle::assemble::{assemble, AssembleSpec};
use runtime::bundle::npy;
use runtime::bundle::{Bundle, BundleLabel, BundleWriter, Provenance, LABEL_EMBEDDINGS, MANIFEST};
use runtime::cli::{run_main, DeviceArgs, LabelArgs, ModelArgs};
use runtime::engine::Engine;
use runtime::image::decode;
use runtime::image::preprocess::{self, PreprocessConfig};
use runtime::text::tokenizer::{ClipTokenizer, Padding};
use runtime::text::{labels, prompts};

#[derive(Parser)]
#[command(version, about = "Inspect, check and adjust xray-clip model bundles")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summary of a bundle's manifest, after checking every file's size and sha256.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Print the whole manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Token ids of each text as JSON (one array per text).
    Tokenize {
        /// Use this bundle's tokenizer (default, and for bundles without one: OpenAI's CLIP
        /// tokenizer, built in).
        #[arg(long, short = 'm')]
        model: Option<PathBuf>,
        /// A tokenizer.json to use instead.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Pad to the 77-token context as OpenAI's `clip.tokenize`.
        #[arg(long)]
        pad: bool,
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Write the normalised model input of an image ([1, 3, S, S] float32) to a .npy file.
    Preprocess {
        /// The image (PNG, JPEG or DICOM).
        path: PathBuf,
        /// The .npy file to write (an existing folder: <image name>.npy inside it).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out file.
        #[arg(long)]
        force: bool,
        /// Use this bundle's preprocessing settings (default: CLIP's).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Build a bundle from ONNX encoders exported elsewhere (HF optimum, torch.onnx).
    Assemble {
        /// ONNX image encoder: pixel_values [batch, 3, S, S] -> image embeddings.
        #[arg(long)]
        image_encoder: PathBuf,
        /// ONNX text encoder: input_ids (and attention_mask) -> text embeddings.
        #[arg(long)]
        text_encoder: Option<PathBuf>,
        /// tokenizer.json for the text encoder (default: OpenAI's CLIP tokenizer, built in).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Label embeddings .npy ([labels, dim]) when there is no text encoder.
        #[arg(long, conflicts_with = "text_encoder")]
        label_embeddings: Option<PathBuf>,
        /// Labels: a built-in set (unifesp, irma, irma-reference), a file with one label per line,
        /// or a comma-separated list.
        #[arg(long)]
        labels: String,
        /// Prompt template(s), `{}` = label (default: the reference's first template).
        #[arg(long = "template")]
        templates: Vec<String>,
        /// exp(logit_scale) of the model (100 for OpenAI's CLIP).
        #[arg(long, default_value_t = 100.0)]
        logit_scale: f32,
        /// Name of the bundle (also its folder's name when --out is a folder of other things).
        #[arg(long, default_value = "assembled")]
        name: String,
        /// Where the starting weights came from, for the manifest.
        #[arg(long, default_value = "unknown")]
        base_weights: String,
        /// HF preprocessor_config.json of the encoders (default: CLIP's 224 px preprocessing).
        #[arg(long)]
        preprocessor_config: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
        /// Bundle folder to write (a folder of other things: the bundle goes inside it).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing bundle at --out.
        #[arg(long)]
        force: bool,
    },
    /// Build a bundle from a CLIP ONNX export as it comes: transformers.js (onnx/vision_model.onnx,
    /// onnx/text_model.onnx), HF optimum (one model.onnx with both towers), or two encoders side by
    /// side; preprocessing and logit scale are read from the files where they are.
    Import {
        /// The export's folder.
        dir: PathBuf,
        /// Labels: a built-in set (unifesp, irma, irma-reference), a file with one label per line,
        /// or a comma-separated list.
        #[arg(long)]
        labels: String,
        /// Prompt template(s), `{}` = label (default: the reference's first template).
        #[arg(long = "template")]
        templates: Vec<String>,
        /// exp(logit_scale) (default: the graph's logit_scale where a model.onnx holds it, else 100).
        #[arg(long)]
        logit_scale: Option<f32>,
        /// transformers.js: use the `_quantized` encoders.
        #[arg(long)]
        quantized: bool,
        /// Name of the bundle (default: the export folder's name).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        device: DeviceArgs,
        /// Bundle folder to write (a folder of other things: the bundle goes inside it).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing bundle at --out.
        #[arg(long)]
        force: bool,
    },
    /// Evaluate a bundle on a data set: top-1/top-5, per-class figures, confusion matrix, per template.
    Eval {
        /// folder (ROOT/<label>/images), unifesp (train.csv + DICOM tree) or irma (codes CSV + PNGs).
        #[arg(long)]
        dataset: runtime::eval::datasets::DatasetKind,
        #[command(flatten)]
        data: runtime::cli::DataArgs,
        #[command(flatten)]
        model: ModelArgs,
        /// Which images: all, train or test (parts of --split-spec), or a split whose test part
        /// is scored: reference (the reference experiment's UNIFESP test images),
        /// head:TRAIN:TEST, random:FRACTION:SEED [default: the test part of the split the model
        /// was trained with when its manifest records one for this data set, else all].
        #[arg(long)]
        split: Option<String>,
        /// How train/test are divided for --split train|test [default: the model's recorded
        /// split for this data set, else head:1200:400 for unifesp and random:0.2:0 otherwise].
        #[arg(long)]
        split_spec: Option<runtime::eval::datasets::Split>,
        /// Prompt template(s) to score with the text encoder (`{}` = label); none: the bundle's labels.
        #[arg(long = "template")]
        templates: Vec<String>,
        /// A file of templates, one per line.
        #[arg(long)]
        templates_file: Option<PathBuf>,
        /// The five templates of the reference experiment.
        #[arg(long)]
        reference_templates: bool,
        /// Images with several labels: any (a hit on any of them) or skip.
        #[arg(long, default_value = "any")]
        multi_label: runtime::eval::MultiLabel,
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Report folder to write: report.json, report.md, confusion.csv, confusion.png (a folder
        /// of other things: the report goes inside it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing report at --out.
        #[arg(long)]
        force: bool,
    },
    /// Recompute a bundle's label embeddings with its text encoder; writes a new bundle to --out.
    Prompts {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        labels: LabelArgs,
        #[command(flatten)]
        device: DeviceArgs,
        /// Name of the new bundle (default: the source bundle's; also the sub-folder's name when
        /// --out is a folder of other things).
        #[arg(long)]
        name: Option<String>,
        /// Folder of the new bundle (a folder of other things: the bundle goes inside it).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing bundle at --out.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    run_main(|| {
        match Cli::parse().command {
            Command::Info { model, json } => {
                let bundle = model.load()?;
                // Loading hashed everything but the ONNX files (hashed when a session loads them).
                for role in [
                    runtime::bundle::IMAGE_ENCODER,
                    runtime::bundle::TEXT_ENCODER,
                ] {
                    if bundle.manifest.files.contains_key(role) {
                        bundle.read_verified(role)?;
                    }
                }
                info(&bundle, json)?
            }
            Command::Tokenize {
                model,
                tokenizer,
                pad,
                texts,
            } => {
                let tok = match (tokenizer, model) {
                    (Some(p), _) => ClipTokenizer::from_file(&p)?,
                    (None, Some(dir)) => {
                        let b = Bundle::load(&dir)?;
                        match b.file_path(runtime::bundle::TOKENIZER) {
                            Some(path) => ClipTokenizer::from_bytes(
                                &b.read_verified(runtime::bundle::TOKENIZER)?,
                                &path,
                            )?,
                            None => {
                                eprintln!(
                                    "note: {} has no tokenizer; using OpenAI's CLIP tokenizer (built in)",
                                    b.dir.display()
                                );
                                runtime::default_tokenizer()?
                            }
                        }
                    }
                    (None, None) => runtime::default_tokenizer()?,
                };
                for t in &texts {
                    let ids = if pad {
                        tok.encode_batch(&[t], Padding::Context)?.ids
                    } else {
                        tok.encode(t)?
                    };
                    println!("{}", serde_json::to_string(&ids)?);
                }
            }
            Command::Preprocess {
                path,
                out,
                force,
                model,
            } => {
                let stem = path
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| "image".into());
                let out = runtime::fs::resolve_output_file(&out, &format!("{stem}.npy"), force)?;
                let cfg = match model {
                    Some(dir) => Bundle::load(&dir)?.manifest.preprocessing,
                    None => PreprocessConfig::default(),
                };
                let img = decode::decode_file(&path)?;
                let t = preprocess::preprocess(&img, &cfg)?;
                let s = cfg.image_size as usize;
                npy::write(&out, &[1, 3, s, s], &t)?;
                eprintln!(
                    "{}: {}x{} -> {} [1, 3, {s}, {s}]",
                    path.display(),
                    img.width,
                    img.height,
                    out.display()
                );
            }
            Command::Assemble {
                image_encoder,
                text_encoder,
                tokenizer,
                label_embeddings,
                labels: label_list,
                templates,
                logit_scale,
                name,
                base_weights,
                preprocessor_config,
                device,
                out,
                force,
            } => {
                let labels = labels::parse_spec(&label_list)?;
                let preprocessing = match preprocessor_config {
                    Some(p) => runtime::bundle::import::preprocessing_of(
                        &std::fs::read(&p).map_err(|e| runtime::Error::io(&p, e))?,
                        &p,
                    )?,
                    None => PreprocessConfig::default(),
                };
                let label_embeddings = match label_embeddings {
                    Some(p) => Some(npy::read(&p)?.1),
                    None => None,
                };
                let templates = if templates.is_empty() {
                    prompts::default_templates()
                } else {
                    templates
                };
                let spec = AssembleSpec {
                    name,
                    description: String::new(),
                    image_encoder,
                    text_encoder,
                    tokenizer,
                    labels,
                    templates,
                    label_embeddings,
                    logit_scale,
                    preprocessing,
                    provenance: Provenance {
                        base_weights,
                        ..Default::default()
                    },
                };
                let b = assemble(spec, &out, force, &device.options())?;
                wrote(&b);
            }
            Command::Import {
                dir,
                labels: label_list,
                templates,
                logit_scale,
                quantized,
                name,
                device,
                out,
                force,
            } => {
                let name = name.unwrap_or_else(|| {
                    std::fs::canonicalize(&dir)
                        .unwrap_or_else(|_| dir.clone())
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_else(|| "imported".into())
                });
                let opts = runtime::bundle::import::ImportOptions {
                    labels: labels::parse_spec(&label_list)?,
                    templates: if templates.is_empty() {
                        prompts::default_templates()
                    } else {
                        templates
                    },
                    logit_scale,
                    quantized,
                    name,
                };
                let (b, found) =
                    runtime::bundle::import::import(&dir, opts, &out, force, &device.options())?;
                eprintln!("layout      {}", found.layout);
                eprintln!("image       {}", found.image_encoder);
                eprintln!("text        {}", found.text_encoder);
                eprintln!(
                    "logit scale {} from {}",
                    b.manifest.logit_scale, found.logit_scale_from
                );
                eprintln!(
                    "input       {} px, from {}",
                    b.manifest.preprocessing.image_size, found.preprocessing_from
                );
                wrote(&b);
            }
            Command::Eval {
                dataset,
                data,
                model,
                split,
                split_spec,
                templates,
                templates_file,
                reference_templates,
                multi_label,
                device,
                batch_size,
                out,
                force,
            } => {
                use runtime::eval::datasets::{self, Split};
                let ds = data.load(dataset)?;
                let mut templates = templates;
                if reference_templates {
                    templates.extend(prompts::REFERENCE_TEMPLATES.iter().map(|t| t.to_string()));
                }
                if let Some(f) = templates_file {
                    let text =
                        std::fs::read_to_string(&f).map_err(|e| runtime::Error::io(&f, e))?;
                    templates.extend(
                        text.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                            .map(String::from),
                    );
                }
                let bundle = match (&model.model, templates.is_empty()) {
                    (Some(_), _) | (None, false) => model.load()?,
                    (None, true) => runtime::cli::find_bundle_for(&ds.labels).map_err(|e| {
                        anyhow::anyhow!("runtime eval --dataset {}: {e}", dataset.name())
                    })?,
                };
                runtime::cli::demo_notice(&bundle);
                // The split the model was trained with, when it was trained on this data set:
                // its test part is what it has not seen.
                let prov = &bundle.manifest.provenance;
                let recorded: Option<Split> = (prov.dataset == ds.name && !prov.split.is_empty())
                    .then(|| prov.split.parse().ok())
                    .flatten();
                let spec = split_spec
                    .or(recorded)
                    .unwrap_or_else(|| Split::default_for(dataset, 0));
                // (part, split it is a part of): None = every image.
                let (part, of) = match (split.as_deref(), recorded) {
                    (None, Some(r)) => {
                        eprintln!(
                            "scoring the test part of split {r}, the one {} was trained with (--split all for every image)",
                            bundle.manifest.name
                        );
                        ("test", Some(spec))
                    }
                    (None | Some("all"), _) => ("all", None),
                    (Some(p @ ("train" | "test")), _) => (p, Some(spec)),
                    (Some(other), _) => {
                        let s: Split = other.parse().map_err(|e: String| {
                            anyhow::anyhow!("--split: {e}; or all, train, test")
                        })?;
                        ("test", Some(s))
                    }
                };
                let (split, samples) = match of {
                    None => ("all".to_string(), ds.samples.clone()),
                    Some(s) => {
                        if part == "train" && Some(s) == recorded {
                            eprintln!(
                                "warning: {} was trained on these images",
                                bundle.manifest.name
                            );
                        }
                        let (train, test) = datasets::split(&ds.samples, s)?;
                        let samples = if part == "train" { train } else { test };
                        (format!("{part} of {s}"), samples)
                    }
                };
                let mut engine = Engine::load(bundle, device.options())?;
                let opts = runtime::eval::EvalOptions {
                    templates,
                    multi_label,
                    pipeline: runtime::pipeline::PipelineOptions {
                        batch_size,
                        workers: 1,
                        progress: true,
                    },
                    dataset: ds.name.clone(),
                    split: split.clone(),
                };
                let ev = runtime::eval::evaluate(&mut engine, &ds.labels, &samples, &opts)?;
                println!(
                    "{} on {} ({split}): {} images, {:.1} images/s, {} unreadable\n",
                    ev.bundle,
                    ev.dataset,
                    ev.images,
                    ev.images_per_second,
                    ev.unreadable.len()
                );
                print!("{}", runtime::eval::report::template_table(&ev));
                let best = ev.best();
                println!(
                    "\nper class (`{}`):\n{}",
                    best.template,
                    runtime::eval::report::class_table(&ev, &best.report)
                );
                for (p, e) in ev.unreadable.iter().take(20) {
                    eprintln!("unreadable: {}: {e}", p.display());
                }
                if let Some(out) = out {
                    let written = runtime::eval::report::write_reports(&ev, &out, force)?;
                    println!("reports in {}", written.display());
                }
            }
            Command::Prompts {
                model,
                labels: label_args,
                name,
                device,
                out,
                force,
            } => {
                let bundle = model.load()?;
                let src = bundle.dir.clone();
                let mut engine = Engine::load(bundle, device.options())?;
                let (labels, emb) = label_args.resolve(&mut engine)?;
                let templates = if label_args.templates.is_empty() {
                    engine.bundle.manifest.templates.clone()
                } else {
                    label_args.templates.clone()
                };
                let mut manifest = engine.bundle.manifest.clone();
                if let Some(name) = name {
                    manifest.name = name;
                }
                manifest.labels = BundleLabel::fill_all(&labels, &templates)?;
                manifest.templates = templates;
                let files = std::mem::take(&mut manifest.files);
                let mut writer = BundleWriter::create(&out, manifest, force)?;
                for (role, entry) in &files {
                    if role == LABEL_EMBEDDINGS || entry.path == MANIFEST {
                        continue;
                    }
                    let bytes = engine.bundle.read_verified(role)?;
                    writer.add_file(
                        role,
                        &entry.path,
                        &bytes,
                        entry.input.as_deref().zip(entry.output.as_deref()),
                    )?;
                }
                writer.add_label_embeddings(&emb)?;
                let written = writer.finish()?;
                println!(
                    "wrote {} ({} labels, from {})",
                    written.dir.display(),
                    labels.len(),
                    src.display()
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn wrote(b: &Bundle) {
    println!(
        "wrote {} ({} labels, {} dims)",
        b.dir.display(),
        b.manifest.labels.len(),
        b.manifest.embedding_dim
    );
}

fn info(b: &Bundle, json: bool) -> anyhow::Result<()> {
    let m = &b.manifest;
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    println!("bundle      {}", b.dir.display());
    println!("name        {} (format {})", m.name, m.format_version);
    if !m.description.is_empty() {
        println!("about       {}", m.description);
    }
    println!(
        "labels      {}: {}",
        m.labels.len(),
        m.labels
            .iter()
            .map(|l| l.label.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("templates   {}", m.templates.join(" | "));
    println!(
        "embedding   {} dims, logit scale {}",
        m.embedding_dim, m.logit_scale
    );
    let p = &m.preprocessing;
    println!(
        "input       {}x{} (shorter side -> {}, {} resize, {} crop)",
        p.image_size, p.image_size, p.resize_shortest_edge, p.resize_filter, p.crop
    );
    for (role, f) in &m.files {
        println!(
            "file        {role:<20} {:<28} {:>12} bytes  sha256 {}…",
            f.path,
            f.bytes,
            &f.sha256[..12]
        );
    }
    println!("base        {}", m.provenance.base_weights);
    if !m.provenance.dataset.is_empty() {
        println!("data        {}", m.provenance.dataset);
    }
    if !m.provenance.metrics.is_null() {
        println!("metrics     {}", m.provenance.metrics);
    }
    Ok(())
}
