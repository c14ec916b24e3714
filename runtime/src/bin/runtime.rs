//! `runtime info | tokenize | preprocess | assemble | import | quantize | eval | prompts | serve`:
//! inspect, build, evaluate and adjust model bundles, and serve one over HTTP.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use runtime::bundle::assemble::{assemble, AssembleSpec};
use runtime::bundle::npy;
use runtime::bundle::{Bundle, BundleLabel, BundleWriter, Provenance, LABEL_EMBEDDINGS, MANIFEST};
use runtime::cli::{run_main, BatchArgs, DeviceArgs, LabelArgs, ModelArgs};
use runtime::engine::Engine;
use runtime::image::decode;
use runtime::image::preprocess::{self, Crop, PreprocessConfig};
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
        /// The bundle (or --model).
        #[arg(value_name = "BUNDLE")]
        bundle: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        /// Print the whole manifest as JSON.
        #[arg(long)]
        json: bool,
        /// Also load the encoder and run the bundle's self-check on --device: fixed inputs must
        /// give the image embeddings written with the bundle.
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        device: DeviceArgs,
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
        /// Which images: all, train, val or test (parts of --split-spec; for the model's own
        /// split, val = the validation rows it held out of its training rows and train = the
        /// rows it trained on), or a split whose test part is scored: reference (the reference experiment's UNIFESP test images),
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
        /// Images that are none of the labels (folders, searched recursively, or files; repeat
        /// for several): a calibrated bundle's "unknown" rule is scored on them (the share
        /// answered unknown, the AUROC of its score against the evaluated images).
        #[arg(long, value_name = "PATH")]
        ood: Vec<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        batch: BatchArgs,
        /// Report folder to write: report.json, report.md, confusion.csv, confusion.png,
        /// predictions.csv (each image's labels and best guesses) and for a calibrated bundle
        /// reliability.png and coverage.png (a folder of other things: the report goes inside it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing report at --out.
        #[arg(long)]
        force: bool,
    },
    /// An int8 copy of a bundle: encoder weights int8 per output channel, activations quantized
    /// at run time; with labelled images (--dataset), checked against the original first and
    /// refused below --min-agreement.
    Quantize {
        /// The fp32 bundle (or --model).
        #[arg(value_name = "BUNDLE")]
        bundle: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        /// Folder of the int8 bundle (a folder of other things: the bundle goes inside it).
        #[arg(long)]
        out: PathBuf,
        /// Name of the int8 bundle [default: the source's name + "-int8"].
        #[arg(long)]
        name: Option<String>,
        /// Labelled images to check the int8 bundle on: folder, unifesp or irma (as runtime
        /// eval; the images runtime eval would score, see --split).
        #[arg(long)]
        dataset: Option<runtime::eval::datasets::DatasetKind>,
        #[command(flatten)]
        data: runtime::cli::DataArgs,
        /// Which images of --dataset, as runtime eval's --split [default: the test part of the
        /// model's recorded split for this data set, else all].
        #[arg(long)]
        split: Option<String>,
        /// The least top-1 agreement with the fp32 bundle on --dataset (a fraction); below it
        /// nothing is written unless --force.
        #[arg(long, default_value_t = 0.99)]
        min_agreement: f64,
        /// MatMul/Gemm weights within +-127 instead of +-63 (more precise on CPUs with VNNI;
        /// AVX2 without VNNI saturates, as ONNX Runtime's reduce_range warns).
        #[arg(long)]
        full_range: bool,
        /// Images like those the bundle will see (folders, searched recursively, or files; no
        /// labels needed): the image encoder's activations get fixed scales from their value
        /// ranges on them (static quantization) instead of scales computed per batch at run time.
        #[arg(long, value_name = "PATH")]
        calibrate: Vec<PathBuf>,
        /// At most this many --calibrate images (spread evenly over the sorted list).
        #[arg(long, value_name = "N", default_value_t = 256)]
        calibrate_images: usize,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        batch: BatchArgs,
        /// Replace an existing bundle at --out, and write even when the check fails.
        #[arg(long)]
        force: bool,
    },
    /// One bundle from several trained for the same labels (same templates and preprocessing):
    /// their encoders side by side in one graph, so it scores an image by the members' mean
    /// cosine similarity to each label. The result is a normal bundle; calibrate it afterwards
    /// (the members' calibrations do not carry over).
    Ensemble {
        /// The member bundles, two or more.
        #[arg(value_name = "BUNDLE", required = true, num_args = 2..)]
        bundles: Vec<PathBuf>,
        /// Folder of the ensemble bundle (a folder of other things: the bundle goes inside it).
        #[arg(long)]
        out: PathBuf,
        /// Name of the ensemble bundle [default: the first member's name + "-ensemble"].
        #[arg(long)]
        name: Option<String>,
        /// Replace an existing bundle at --out.
        #[arg(long)]
        force: bool,
    },
    /// Fit a bundle's calibration and write a calibrated copy to --out: a temperature for its label
    /// probabilities, fitted on held-out labelled images (never the model's own test images), and
    /// an "unknown" rule: a threshold on the cosine to the nearest class centroid (or on the
    /// calibrated top-1 probability), chosen on --ood images (none of its labels) for
    /// --target-false-accept. classify, eval, serve and the page then answer "unknown" below it.
    Calibrate {
        /// The bundle (or --model).
        #[arg(value_name = "BUNDLE")]
        bundle: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        /// Labelled images to fit the temperature on: folder, unifesp or irma (as runtime eval)
        /// [default: the data set the model records it was trained on].
        #[arg(long)]
        dataset: Option<runtime::eval::datasets::DatasetKind>,
        #[command(flatten)]
        data: runtime::cli::DataArgs,
        /// Which images of --dataset, as runtime eval's --split (all, train, val, test or a split
        /// spec; val: the validation rows the model held out). Images of the model's recorded
        /// test part are refused: calibrate on held-out images, evaluate on the test ones
        /// [default: val when the model records validation rows of this data set, all when it
        /// was not trained on it].
        #[arg(long)]
        split: Option<String>,
        /// What the "unknown" rule thresholds.
        #[arg(long, value_enum, default_value_t = runtime::calibration::RejectScore::Centroid)]
        reject_score: runtime::calibration::RejectScore,
        /// Images of --dataset to compute the class centroids from, as --split (e.g. train: the
        /// rows the model trained on, which hold every label) [default: train when --split is
        /// val, else the --split images].
        #[arg(long, value_name = "SPLIT")]
        centroid_split: Option<String>,
        /// Images that are none of the bundle's labels (folders, searched recursively, or files;
        /// repeat the option for several): the "unknown" threshold is chosen on them. Without it
        /// only the temperature is fitted.
        #[arg(long, value_name = "PATH")]
        ood: Vec<PathBuf>,
        /// The largest share of the --ood images the "unknown" rule may let through.
        #[arg(long, default_value_t = 0.05)]
        target_false_accept: f64,
        /// Folder of the calibrated bundle (a folder of other things: the bundle goes inside it).
        #[arg(long)]
        out: PathBuf,
        /// Name of the calibrated bundle [default: the source's name + "-calibrated"].
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        batch: BatchArgs,
        /// Replace an existing bundle at --out.
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
    /// The classifier as a service: over HTTP (POST /v1/classify with an image as the body, or
    /// several as multipart/form-data; ?top_k=, ?labels=; GET /v1/model, /healthz, /readyz,
    /// /metrics) and/or as a DICOM node (C-STORE and C-ECHO; one JSON line per received instance
    /// to --results).
    #[cfg(feature = "serve")]
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        device: DeviceArgs,
        /// HTTP address to listen on (port 0: any free port, printed at start) [default:
        /// 127.0.0.1:8080 unless --dicom is given alone].
        #[arg(long, value_name = "ADDR:PORT")]
        http: Option<std::net::SocketAddr>,
        /// DICOM address to listen on, e.g. 0.0.0.0:11112 (port 0: any free port, printed at start).
        #[arg(long, value_name = "ADDR:PORT", requires = "results")]
        dicom: Option<std::net::SocketAddr>,
        /// The DICOM node's AE title (associations calling another title are rejected).
        #[arg(long, default_value = "XRAYCLIP", requires = "dicom")]
        ae_title: String,
        /// File the DICOM node appends one JSON line to per received instance (UIDs,
        /// BodyPartExamined, prediction, the body-part term it implies, whether they disagree).
        #[arg(long, value_name = "FILE", requires = "dicom")]
        results: Option<PathBuf>,
        /// Also POST each DICOM result line as JSON to this URL (http://HOST[:PORT]/PATH).
        #[arg(long, value_name = "URL", requires = "dicom")]
        post: Option<String>,
        /// Keep received DICOM instances, unchanged, in this folder as <SOPInstanceUID>.dcm (never
        /// replacing a file); without it nothing received is kept.
        #[arg(long, value_name = "DIR", requires = "dicom")]
        store: Option<PathBuf>,
        /// Largest PDU the DICOM node receives, in bytes (announced to senders; larger PDUs end the
        /// association). At least 16 KiB: an association request proposing every storage class
        /// (as storescu does) is a PDU of about 12 kB.
        #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(16_384..=16_777_216), requires = "dicom")]
        max_pdu: u32,
        /// DICOM associations served at once (more wait to be accepted).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_024), requires = "dicom")]
        max_associations: u32,
        /// Close a DICOM association that sends nothing for this many milliseconds.
        #[arg(long, default_value_t = 60_000, requires = "dicom")]
        dicom_timeout_ms: u64,
        /// Most images in one encoder call.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
        max_batch: u16,
        /// How long the encoder waits for more images once one is waiting, in milliseconds.
        #[arg(long, default_value_t = 5)]
        max_wait_ms: u64,
        /// Images the HTTP service takes in at once (being decoded, waiting for the encoder or in
        /// it); beyond, requests get 503 with Retry-After before their body is read. DICOM senders
        /// wait for their response instead.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
        queue: u32,
        /// Largest HTTP request body or DICOM instance in bytes (HTTP 413, C-STORE status A700).
        #[arg(long, default_value_t = 64 << 20)]
        max_body: usize,
        /// Longest an HTTP request may take, in milliseconds (504 beyond).
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        /// Images the HTTP service decodes at once [default: one per core].
        #[arg(long)]
        workers: Option<usize>,
        /// Labels per image in the answer unless the request says ?top_k=.
        #[arg(long, short = 'k', default_value_t = 3)]
        top_k: usize,
        /// Close an HTTP connection whose request head has not arrived within this many
        /// milliseconds.
        #[arg(long, default_value_t = 10_000)]
        header_timeout_ms: u64,
        /// Most HTTP connections open at once (more wait to be accepted).
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65_536))]
        max_connections: u32,
    },
}

fn main() -> ExitCode {
    run_main(|| {
        match Cli::parse().command {
            Command::Info {
                bundle,
                model,
                json,
                check,
                device,
            } => {
                let bundle = source_bundle(bundle, &model)?;
                // Loading hashed everything but the ONNX files (hashed when a session loads them).
                for role in [
                    runtime::bundle::IMAGE_ENCODER,
                    runtime::bundle::TEXT_ENCODER,
                ] {
                    if bundle.manifest.files.contains_key(role) {
                        bundle.read_verified(role)?;
                    }
                }
                let summary = check.then(|| bundle.clone());
                info(&bundle, json)?;
                if let Some(bundle) = summary {
                    let mut engine = Engine::load(bundle, device.options())?;
                    let line = match engine.self_check()? {
                        Some(diff) => format!(
                            "self-check: passed on {} (largest difference {diff:.1e}, tolerance {:.0e})",
                            engine.device().name(),
                            engine.bundle.manifest.self_check.as_ref().map_or(0.0, |c| c.tolerance)
                        ),
                        None => "self-check: none in this bundle (written before self-checks existed)".into(),
                    };
                    if json {
                        eprintln!("{line}");
                    } else {
                        println!("{line}");
                    }
                }
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
            Command::Calibrate {
                bundle,
                model,
                dataset,
                data,
                split,
                reject_score,
                centroid_split,
                ood,
                target_false_accept,
                out,
                name,
                device,
                batch,
                force,
            } => {
                use runtime::bundle::calibrate;
                if !(0.0..=1.0).contains(&target_false_accept) {
                    anyhow::bail!(
                        "--target-false-accept {target_false_accept} is not a fraction in [0, 1]"
                    );
                }
                let src = source_bundle(bundle, &model)?;
                let prov = &src.manifest.provenance;
                let dataset = match dataset {
                    Some(d) => d,
                    None => runtime::eval::datasets::DatasetKind::of_name(&prov.dataset)
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "--dataset: {} records no data set it was trained on; give --dataset folder, unifesp or irma",
                                src.manifest.name
                            )
                        })?,
                };
                let ds = data.load(dataset)?;
                let split = match split {
                    Some(s) => s,
                    None if prov.dataset != ds.name => "all".to_string(),
                    None if prov.training["val"].as_f64().is_some_and(|v| v > 0.0) => {
                        "val".to_string()
                    }
                    None => anyhow::bail!(
                        "--split: {} was trained on {} without validation rows: give held-out labelled images (--split SPEC, or another --data); never its training or test images",
                        src.manifest.name,
                        ds.name
                    ),
                };
                let centroid_split =
                    centroid_split.or_else(|| (split == "val").then(|| "train".to_string()));
                // The model's own test images are never used to fit anything.
                let recorded_test: std::collections::HashSet<PathBuf> =
                    if src.manifest.provenance.dataset == ds.name {
                        eval_samples(&src, &ds, dataset, None, None)?
                            .1
                            .into_iter()
                            .map(|s| s.path)
                            .collect()
                    } else {
                        Default::default()
                    };
                let mine: Vec<&runtime::text::labels::Label> = src.labels();
                let index =
                    runtime::text::labels::match_labels(&mine, &ds.labels).ok_or_else(|| {
                        anyhow::anyhow!(
                            "the labels of {} are not all among the bundle's {}",
                            ds.name,
                            mine.len()
                        )
                    })?;
                // The labelled images of a --split (or --centroid-split) value, never test ones.
                let labelled = |option: &str,
                                split: &str|
                 -> anyhow::Result<(String, Vec<(PathBuf, usize)>)> {
                    let (split_name, samples) =
                        eval_samples(&src, &ds, dataset, Some(split.to_string()), None)?;
                    if samples.iter().any(|s| recorded_test.contains(&s.path)) {
                        anyhow::bail!(
                            "{option} {split} holds images of {}'s test part (provenance: {} {}): calibrate on held-out training images, not on the test images",
                            src.manifest.name,
                            src.manifest.provenance.dataset,
                            src.manifest.provenance.split
                        );
                    }
                    let images = samples
                        .iter()
                        .map(|s| (s.path.clone(), index[s.primary()]))
                        .collect();
                    Ok((format!("{} ({split_name})", ds.name), images))
                };
                let (data_name, images) = labelled("--split", &split)?;
                let centroid_set = match &centroid_split {
                    Some(c) => Some(labelled("--centroid-split", c)?),
                    None => None,
                };
                let ood_files = list_images("--ood", &ood)?;
                let set = calibrate::CalibrationSet {
                    data: data_name,
                    images: &images,
                    centroid_images: centroid_set.as_ref().map(|(n, i)| (n.clone(), &i[..])),
                    ood_data: ood_names(&ood),
                    ood: &ood_files,
                    score: reject_score,
                    target_false_accept,
                };
                let mut engine = Engine::load(src.clone(), device.options())?;
                let fitted = calibrate::fit(&mut engine, &set, &batch.pipeline(true))?;
                let c = &fitted.calibration;
                let f = &c.fitted_on;
                println!(
                    "temperature {:.4} on {} images of {}: NLL {:.4} -> {:.4}, ECE {:.4} -> {:.4}",
                    c.temperature,
                    f.images,
                    f.data,
                    f.nll_before,
                    f.nll_after,
                    f.ece_before,
                    f.ece_after
                );
                if let (Some(t), Some(r)) = (c.reject_below, &f.reject) {
                    if !r.centroid_data.is_empty() {
                        println!(
                            "class centroids from {} images of {}",
                            r.centroid_images, r.centroid_data
                        );
                    }
                    println!(
                        "unknown below {t:.6} ({}): {:.4} of {} --ood images let through (target {:.4}); {:.4} of the labelled images kept, top-1 {:.4} on them; AUROC {:.4}",
                        c.reject_score.name(), r.false_accept, r.ood_images, r.target_false_accept, r.in_distribution_accepted, r.accuracy_accepted, r.auroc
                    );
                }
                if fitted.skipped > 0 {
                    eprintln!(
                        "warning: {} images could not be decoded and were left out",
                        fitted.skipped
                    );
                }
                let name = name.unwrap_or_else(|| format!("{}-calibrated", src.manifest.name));
                let written = calibrate::write_bundle(&src, fitted, &name, &out, force)?;
                wrote(&written);
            }
            Command::Ensemble {
                bundles,
                out,
                name,
                force,
            } => {
                let members: Vec<Bundle> = bundles
                    .iter()
                    .map(|b| Bundle::load(b))
                    .collect::<Result<_, _>>()?;
                for m in members.iter().filter(|m| m.manifest.calibration.is_some()) {
                    eprintln!(
                        "note: {} is calibrated; the ensemble is not (runtime calibrate it)",
                        m.dir.display()
                    );
                }
                let name = name.unwrap_or_else(|| format!("{}-ensemble", members[0].manifest.name));
                let written =
                    runtime::bundle::ensemble::write_ensemble(&members, &name, &out, force)?;
                wrote(&written);
            }
            Command::Quantize {
                bundle,
                model,
                out,
                name,
                dataset,
                data,
                split,
                min_agreement,
                full_range,
                calibrate,
                calibrate_images,
                device,
                batch,
                force,
            } => {
                use runtime::bundle::quantize;
                if !(0.0..=1.0).contains(&min_agreement) {
                    anyhow::bail!("--min-agreement {min_agreement} is not a fraction in [0, 1]");
                }
                if calibrate_images == 0 {
                    anyhow::bail!("--calibrate-images must be at least 1");
                }
                let src = source_bundle(bundle, &model)?;
                if let Some(q) = &src.manifest.quantization {
                    anyhow::bail!(
                        "{} is already {} (made from {}); quantize the fp32 bundle",
                        src.dir.display(),
                        q.precision,
                        q.source
                    );
                }
                let name = name.unwrap_or_else(|| format!("{}-int8", src.manifest.name));
                let ranges = if calibrate.is_empty() {
                    None
                } else {
                    let mut files = list_images("--calibrate", &calibrate)?;
                    files.sort();
                    let files = spread(files, calibrate_images);
                    let (ranges, read) = quantize::activation_ranges(
                        &src,
                        &files,
                        &device.options(),
                        batch.batch_size as usize,
                    )?;
                    eprintln!(
                        "activation ranges of {} tensors from {read} calibration images{}",
                        ranges.len(),
                        if read < files.len() {
                            format!(" ({} unreadable, left out)", files.len() - read)
                        } else {
                            String::new()
                        }
                    );
                    Some((ranges, read))
                };
                let opts = quantize::QuantizeOptions {
                    full_range,
                    activation_ranges: ranges.as_ref().map(|(r, _)| r),
                };
                let (image, text, mut record) = quantize::quantize_bundle(&src, opts)?;
                record.calibration_images = ranges.as_ref().map_or(0, |(_, n)| *n);
                let size =
                    |b: &Bundle, role: &str| b.manifest.files.get(role).map_or(0, |f| f.bytes);
                eprintln!(
                    "image encoder: {} MatMul/Gemm and {} Conv layers int8 ({} -> {} bytes)",
                    record.image_encoder.matmuls,
                    record.image_encoder.convs,
                    size(&src, runtime::bundle::IMAGE_ENCODER),
                    image.len()
                );
                if let Some(dataset) = dataset {
                    let ds = data.load(dataset)?;
                    let (split, samples) = eval_samples(&src, &ds, dataset, split, None)?;
                    // The int8 bundle is tried from a temporary folder before anything is written.
                    let trial_dir = tempfile::tempdir()?;
                    let trial = quantize::write_bundle(
                        &src,
                        &image,
                        text.as_deref(),
                        record.clone(),
                        &name,
                        &trial_dir.path().join("bundle"),
                        false,
                    )?;
                    let mut fp32 = Engine::load(src.clone(), device.options())?;
                    let mut int8 = Engine::load(trial, device.options())?;
                    let set = quantize::CheckSet {
                        labels: &ds.labels,
                        samples: &samples,
                        dataset: ds.name.clone(),
                        split,
                    };
                    let check = quantize::agreement(
                        &mut fp32,
                        &mut int8,
                        &set,
                        &batch.pipeline(true),
                        min_agreement,
                    )?;
                    println!(
                        "check on {} ({}): {} images, top-1 agreement {:.4} (required {:.4}), top-1 fp32 {:.4} -> int8 {:.4} ({:+.2} points), embedding cosine mean {:.5}, min {:.5}",
                        check.dataset,
                        check.split,
                        check.images,
                        check.agreement,
                        check.min_agreement,
                        check.fp32_top1,
                        check.int8_top1,
                        (check.int8_top1 - check.fp32_top1) * 100.0,
                        check.mean_cosine,
                        check.min_cosine
                    );
                    let passed = check.passed();
                    record.check = Some(check);
                    if !passed && !force {
                        anyhow::bail!(
                            "top-1 agreement {:.4} is below --min-agreement {min_agreement}: nothing written (--force writes it anyway)",
                            record.check.as_ref().map_or(0.0, |c| c.agreement)
                        );
                    }
                }
                let b = quantize::write_bundle(
                    &src,
                    &image,
                    text.as_deref(),
                    record,
                    &name,
                    &out,
                    force,
                )?;
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
                ood,
                device,
                batch,
                out,
                force,
            } => {
                let ds = data.load(dataset)?;
                let ood_files = list_images("--ood", &ood)?;
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
                if !ood.is_empty() && (bundle.reject_rule().is_none() || !templates.is_empty()) {
                    anyhow::bail!(
                        "--ood scores a calibrated bundle's \"unknown\" rule on its own labels: {} has none{} (runtime calibrate makes one)",
                        bundle.manifest.name,
                        if templates.is_empty() { "" } else { " for --template scores" }
                    );
                }
                let (split, samples) = eval_samples(&bundle, &ds, dataset, split, split_spec)?;
                let mut engine = Engine::load(bundle, device.options())?;
                let opts = runtime::eval::EvalOptions {
                    templates,
                    multi_label,
                    pipeline: batch.pipeline(true),
                    dataset: ds.name.clone(),
                    split: split.clone(),
                    ood: ood_files,
                    ood_data: ood_names(&ood),
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
                if let Some(c) = &ev.calibration {
                    println!("{}", runtime::eval::report::calibration_line(c));
                }
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
                // A calibration was fitted on the old label embeddings (its centroids on the old
                // labels): it does not hold for the new ones.
                if manifest.calibration.take().is_some() {
                    eprintln!("note: the source's calibration is not carried over (it was fitted on its labels); run runtime calibrate on the new bundle");
                }
                manifest.format_version = manifest.needed_format_version();
                let files = std::mem::take(&mut manifest.files);
                let mut writer = BundleWriter::create(&out, manifest, force)?;
                for (role, entry) in &files {
                    if role == LABEL_EMBEDDINGS
                        || role == runtime::bundle::CLASS_CENTROIDS
                        || entry.path == MANIFEST
                    {
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
            #[cfg(feature = "serve")]
            Command::Serve {
                model,
                device,
                http,
                dicom,
                ae_title,
                results,
                post,
                store,
                max_pdu,
                max_associations,
                dicom_timeout_ms,
                max_batch,
                max_wait_ms,
                queue,
                max_body,
                timeout_ms,
                workers,
                top_k,
                header_timeout_ms,
                max_connections,
            } => {
                use runtime::serve::{DicomOptions, HttpOptions, Listening, ServeOptions};
                use std::time::Duration;
                tracing_subscriber::fmt()
                    .with_writer(std::io::stderr)
                    .with_env_filter(
                        tracing_subscriber::EnvFilter::try_from_default_env()
                            .unwrap_or_else(|_| "info".into()),
                    )
                    .init();
                let post = post
                    .map(|u| {
                        u.parse::<axum::http::Uri>()
                            .map_err(|e| anyhow::anyhow!("--post {u}: {e}"))
                    })
                    .transpose()?;
                let bundle = model.load()?;
                let labels = bundle.manifest.labels.len();
                if top_k == 0 || top_k > labels {
                    anyhow::bail!("-k {top_k} is not between 1 and the bundle's {labels} labels");
                }
                // HTTP on its default address unless the DICOM node is asked for alone.
                let http = match (http, dicom) {
                    (Some(addr), _) => Some(addr),
                    (None, None) => Some(std::net::SocketAddr::from(([127, 0, 0, 1], 8080))),
                    (None, Some(_)) => None,
                };
                let options = ServeOptions {
                    http: http.map(|addr| HttpOptions {
                        addr,
                        max_body,
                        timeout: Duration::from_millis(timeout_ms),
                        header_timeout: Duration::from_millis(header_timeout_ms),
                        max_connections: max_connections as usize,
                    }),
                    dicom: dicom.map(|addr| DicomOptions {
                        addr,
                        ae_title: ae_title.clone(),
                        results: results
                            .clone()
                            .expect("clap requires --results with --dicom"),
                        post: post.clone(),
                        store: store.clone(),
                        max_pdu,
                        max_associations: max_associations as usize,
                        idle_timeout: Duration::from_millis(dicom_timeout_ms),
                        max_instance: max_body,
                    }),
                    max_batch: max_batch.into(),
                    max_wait: Duration::from_millis(max_wait_ms),
                    queue: queue as usize,
                    workers: workers.unwrap_or_else(runtime::pipeline::default_workers),
                    top_k,
                };
                let ae = ae_title.trim().to_string();
                runtime::serve::serve(bundle, device.options(), options, |listening| {
                    // First lines on stdout, for scripts and tests that asked for port 0.
                    match listening {
                        Listening::Http(addr) => println!("listening on http://{addr}"),
                        Listening::Dicom(addr) => {
                            println!("listening on dicom://{addr} (AE title {ae})")
                        }
                    }
                })?;
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
    match p.crop {
        Crop::Center => println!(
            "input       {}x{} (shorter side -> {}, {} resize, center crop)",
            p.image_size, p.image_size, p.resize_shortest_edge, p.resize_filter
        ),
        Crop::None => println!(
            "input       {}x{} (the whole image, {} resize, no crop)",
            p.image_size, p.image_size, p.resize_filter
        ),
    }
    match &m.calibration {
        None => println!("calibration none"),
        Some(c) => {
            println!(
                "calibration temperature {:.4} (on {} images of {})",
                c.temperature, c.fitted_on.images, c.fitted_on.data
            );
            if let (Some(t), Some(r)) = (c.reject_below, &c.fitted_on.reject) {
                println!(
                    "unknown     below {t:.4} {}: chosen on {} images of {} ({:.4} let through), {:.4} of the labelled images kept",
                    c.reject_score.name(),
                    r.ood_images,
                    r.ood_data,
                    r.false_accept,
                    r.in_distribution_accepted
                );
            }
        }
    }
    match &m.quantization {
        None => println!("precision   not quantized"),
        Some(q) => {
            println!(
                "precision   {} ({}), from {}",
                q.precision, q.scheme, q.source
            );
            if let Some(c) = &q.check {
                println!(
                    "checked     on {} ({}), {} images: top-1 agreement {:.4}, top-1 fp32 {:.4} -> {} {:.4}",
                    c.dataset, c.split, c.images, c.agreement, c.fp32_top1, q.precision, c.int8_top1
                );
            }
        }
    }
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

/// The images `runtime eval` (and `runtime quantize`'s check) scores: by default the test part of
/// the split the model was trained with, when it was trained on this data set (what it has not
/// seen), else all; returns a description of the choice and the samples.
/// The image files under each of `paths` (folders searched recursively, or files); a path with none
/// is an error naming `option`.
fn list_images(option: &str, paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let before = files.len();
        files.extend(runtime::image::files::list([path.clone()]).filter_map(|l| l.ok()));
        if files.len() == before {
            anyhow::bail!("{option} {}: no images found", path.display());
        }
    }
    Ok(files)
}

/// At most `n` of `items`, evenly spread (all of them when there are not more).
fn spread<T>(items: Vec<T>, n: usize) -> Vec<T> {
    let len = items.len();
    if len <= n {
        return items;
    }
    items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| (i * n) % len < n)
        .map(|(_, item)| item)
        .collect()
}

/// The paths as one line, for reports.
fn ood_names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bundle a command works from: BUNDLE or --model (the built-in one when neither is given).
fn source_bundle(bundle: Option<PathBuf>, model: &ModelArgs) -> anyhow::Result<Bundle> {
    match (bundle, &model.model) {
        (Some(_), Some(_)) => anyhow::bail!("give the bundle once: BUNDLE or --model, not both"),
        (Some(b), None) => Ok(Bundle::load(&b)?),
        (None, _) => Ok(model.load()?),
    }
}

fn eval_samples(
    bundle: &runtime::bundle::Bundle,
    ds: &runtime::eval::datasets::Dataset,
    dataset: runtime::eval::datasets::DatasetKind,
    split: Option<String>,
    split_spec: Option<runtime::eval::datasets::Split>,
) -> anyhow::Result<(String, Vec<runtime::eval::datasets::Sample>)> {
    use runtime::eval::datasets::{self, Split};
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
        (Some(p @ ("train" | "val" | "test")), _) => (p, Some(spec)),
        (Some(other), _) => {
            let s: Split = other
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--split: {e}; or all, train, val, test"))?;
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
            // The validation rows the model held out of its training rows, when it did.
            let training = &prov.training;
            let held_out = (Some(s) == recorded)
                .then(|| training["val"].as_f64().zip(training["seed"].as_u64()))
                .flatten()
                .filter(|(v, _)| *v > 0.0);
            let samples = match (part, held_out) {
                ("test", _) => test,
                ("train", None) => train,
                ("train", Some((v, seed))) => datasets::validation_split(&train, v, seed)?.0,
                (_, Some((v, seed))) => datasets::validation_split(&train, v, seed)?.1,
                (_, None) => anyhow::bail!(
                    "--split val: {} records no validation rows of split {s} on {} (trained with --val 0, or on another split or data set)",
                    bundle.manifest.name,
                    ds.name
                ),
            };
            let what = match (part, held_out) {
                ("train", Some((v, seed))) => {
                    format!("train of {s} without its validation rows (val {v}, seed {seed})")
                }
                ("val", Some((v, seed))) => {
                    format!("validation rows (val {v}, seed {seed}) of {s}")
                }
                _ => format!("{part} of {s}"),
            };
            (what, samples)
        }
    };
    Ok((split, samples))
}

#[cfg(test)]
mod tests {
    #[test]
    fn spread_keeps_n_evenly_and_all_when_fewer() {
        let picked = super::spread((0..10).collect::<Vec<_>>(), 4);
        assert_eq!(picked, vec![0, 3, 5, 8]);
        assert_eq!(super::spread(vec![1, 2, 3], 5), vec![1, 2, 3]);
        assert_eq!(super::spread((0..1000).collect::<Vec<_>>(), 256).len(), 256);
    }
}
