//! The `trainer` command line: `init`, `finetune` (and `export`).

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use runtime::datasets::{self, DatasetKind, Split};
use runtime::preprocess::PreprocessConfig;
use runtime::tokenizer::ClipTokenizer;
use tch::Device;

use crate::data::{BadImages, ImageSet};
use crate::error::{Error, Result};
use crate::export::{self, ExportSpec};
use crate::model::ClipConfig;
use crate::onnx::Precision;
use crate::optim::AdamConfig;
use crate::train::{self, LossKind, RunInputs, TrainOptions};
use crate::weights;

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

#[derive(Args)]
pub struct ExportArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// `unifesp`, `irma`, a file with one label per line, or a comma-separated list.
    #[arg(long)]
    pub labels: String,
    /// Prompt template(s), `{}` = label; several are averaged.
    #[arg(long = "template")]
    pub templates: Vec<String>,
    #[arg(long)]
    pub out: PathBuf,
    /// fp32 (CPU default) or fp16 (for GPUs).
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    #[arg(long)]
    pub name: Option<String>,
    /// Leave out the text encoder and tokenizer (fixed labels only).
    #[arg(long)]
    pub no_text_encoder: bool,
}

#[derive(Args)]
pub struct PredictArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// `unifesp`, `irma`, a file with one label per line, or a comma-separated list.
    #[arg(long)]
    pub labels: String,
    #[arg(long = "template")]
    pub templates: Vec<String>,
    #[arg(long, short = 'k', default_value_t = 3)]
    pub top_k: usize,
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

#[derive(Args)]
pub struct InitArgs {
    /// HF model folder (config.json + model.safetensors [+ tokenizer.json]) or OpenAI's `.pt` archive.
    #[arg(long, conflicts_with = "config")]
    pub from: Option<PathBuf>,
    /// Random weights with a preset configuration: vit-b-32, vit-b-16, vit-l-14, small, tiny.
    #[arg(long)]
    pub config: Option<String>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// tokenizer.json to store with the checkpoint (default: the HF folder's, else OpenAI's BPE
    /// vocabulary in models/tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct FinetuneArgs {
    /// Data folder (layout given by --dataset).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "folder")]
    pub dataset: DatasetKind,
    /// A separate test folder (same layout); else --split divides --data.
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// head:TRAIN:TEST (the reference's first/last images) or random:FRACTION:SEED.
    #[arg(long)]
    pub split: Option<Split>,
    /// Checkpoint folder to start from (`trainer init`).
    #[arg(long)]
    pub init: PathBuf,
    /// Run folder: checkpoints, metrics.csv/json, curves.png. With several learning rates, one
    /// sub-folder per rate.
    #[arg(long)]
    pub out: PathBuf,
    /// Learning rate(s); several, comma-separated, run a sweep.
    #[arg(long, default_value = "1e-6", value_delimiter = ',')]
    pub lr: Vec<f64>,
    #[arg(long, default_value_t = 50)]
    pub epochs: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0.001)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.98)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-6)]
    pub eps: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "contrastive")]
    pub loss: LossKind,
    /// Prompt template(s); the first makes the training prompts, all score the test set.
    #[arg(long = "template")]
    pub templates: Vec<String>,
    #[arg(long)]
    pub freeze_vision: bool,
    #[arg(long)]
    pub freeze_text: bool,
    /// cpu, cuda or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads for libtorch (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Turn fp16 mixed precision off on CUDA.
    #[arg(long)]
    pub no_mixed_precision: bool,
    /// Unreadable images: skip (counted and listed) or fail.
    #[arg(long, default_value = "skip")]
    pub bad_images: BadImages,
    /// Continue from the run folder's newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Checkpoints kept besides the best.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Use at most this many training / test images (quick runs).
    #[arg(long)]
    pub max_train: Option<usize>,
    #[arg(long)]
    pub max_test: Option<usize>,
    /// Export the best checkpoint (of the best learning rate) as a bundle into this folder.
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Precision of the exported encoders.
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    /// Leave the text encoder and tokenizer out of the exported bundle (fixed labels only).
    #[arg(long)]
    pub no_text_encoder: bool,
    /// Random contrast and brightness changes of the training images.
    #[arg(long)]
    pub augment: bool,
    /// Name, description, license and notes written into the exported bundle's manifest.
    #[arg(long)]
    pub bundle_name: Option<String>,
    #[arg(long, default_value = "")]
    pub bundle_description: String,
    #[arg(long, default_value = "")]
    pub bundle_license: String,
    #[arg(long, default_value = "")]
    pub bundle_notes: String,
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

pub fn init(a: &InitArgs) -> Result<()> {
    let (config, tensors, hf_tokenizer) = match (&a.from, &a.config) {
        (Some(from), _) if from.is_dir() => {
            let config = weights::read_config(&from.join(weights::CONFIG))?;
            (
                config,
                Some(weights::read_safetensors(from)?),
                Some(from.join("tokenizer.json")).filter(|p| p.exists()),
            )
        }
        (Some(from), _) => {
            let (config, tensors) = weights::read_openai_torchscript(from)?;
            (config, Some(tensors), None)
        }
        (None, Some(name)) => {
            let config = ClipConfig::preset(name)
                .ok_or_else(|| Error::Config(format!("unknown configuration {name:?}")))?;
            (config, None, None)
        }
        (None, None) => return Err(Error::Config("give --from PATH or --config NAME".into())),
    };
    tch::manual_seed(a.seed);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _model = crate::model::Clip::new(&vs.root(), &config);
    let source = a
        .from
        .clone()
        .unwrap_or_else(|| PathBuf::from("random init"));
    if let Some(t) = tensors {
        weights::assign(&vs, t, &source)?;
    }
    let tok_path = a
        .tokenizer
        .clone()
        .or(hf_tokenizer)
        .unwrap_or_else(runtime::default_tokenizer_path);
    let tok_bytes = std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
    let tok = ClipTokenizer::from_bytes(&tok_bytes, &tok_path)?;
    if tok.vocab_size() as i64 > config.text_config.vocab_size {
        eprintln!(
            "notice: the tokenizer has {} tokens, the model's vocabulary {}",
            tok.vocab_size(),
            config.text_config.vocab_size
        );
    }
    let provenance = serde_json::json!({"source": source, "seed": a.seed});
    weights::save_checkpoint(&a.out, &config, &vs, |staging| {
        runtime::fsutil::write_atomic(&staging.join("tokenizer.json"), &tok_bytes)?;
        let json = serde_json::to_vec_pretty(&provenance).expect("json");
        Ok(runtime::fsutil::write_atomic(
            &staging.join("provenance.json"),
            &json,
        )?)
    })?;
    let params: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    println!(
        "wrote {} ({:.1} M parameters, from {})",
        a.out.display(),
        params as f64 / 1e6,
        source.display()
    );
    Ok(())
}

fn limit(mut v: Vec<datasets::Sample>, n: Option<usize>) -> Vec<datasets::Sample> {
    if let Some(n) = n {
        // Keep every class represented: take round-robin over labels.
        if n < v.len() {
            let mut by_label: std::collections::BTreeMap<usize, Vec<datasets::Sample>> =
                Default::default();
            for s in v.drain(..) {
                by_label.entry(s.primary()).or_default().push(s);
            }
            let mut queues: Vec<std::collections::VecDeque<_>> =
                by_label.into_values().map(Into::into).collect();
            while v.len() < n {
                for q in queues.iter_mut() {
                    if let Some(s) = q.pop_front() {
                        if v.len() < n {
                            v.push(s);
                        }
                    }
                }
            }
        }
    }
    v
}

pub fn finetune(a: &FinetuneArgs) -> Result<Vec<train::RunResult>> {
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    let device = device(&a.device)?;
    let ds = datasets::load(a.dataset, &a.data)?;
    for p in &ds.problems {
        eprintln!("warning: {p}");
    }
    let (train_samples, test_samples) = match &a.test_data {
        Some(t) => {
            let test = datasets::load(a.dataset, t)?;
            if test.labels != ds.labels {
                return Err(Error::Data(format!(
                    "{}: its labels differ from {}",
                    t.display(),
                    a.data.display()
                )));
            }
            (ds.samples.clone(), test.samples)
        }
        None => {
            let split = a.split.unwrap_or(match a.dataset {
                DatasetKind::Unifesp => Split::HeadTail {
                    train: 1200,
                    test: 400,
                },
                _ => Split::Random {
                    test_fraction: 0.2,
                    seed: a.seed,
                },
            });
            datasets::split(&ds.samples, split)?
        }
    };
    let train_samples = limit(train_samples, a.max_train);
    let test_samples = limit(test_samples, a.max_test);
    if train_samples.is_empty() || test_samples.is_empty() {
        return Err(Error::Data("the train or test split is empty".into()));
    }
    let cfg = PreprocessConfig::default();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let train_set = ImageSet::load(&train_samples, &cfg, a.bad_images, threads, "train images")?;
    let test_set = ImageSet::load(&test_samples, &cfg, a.bad_images, threads, "test images")?;
    for (what, set) in [("train", &train_set), ("test", &test_set)] {
        if !set.skipped.is_empty() {
            eprintln!(
                "warning: skipped {} unreadable {what} image(s):",
                set.skipped.len()
            );
            for (p, e) in set.skipped.iter().take(20) {
                eprintln!("  {}: {e}", p.display());
            }
        }
    }
    eprintln!(
        "{}: {} labels, {} train and {} test images, device {device:?}",
        ds.name,
        ds.labels.len(),
        train_set.len(),
        test_set.len()
    );
    let tok_path = a.init.join("tokenizer.json");
    let tok_path = if tok_path.exists() {
        tok_path
    } else {
        runtime::default_tokenizer_path()
    };
    let tokenizer = ClipTokenizer::from_file(&tok_path)?;
    let templates = if a.templates.is_empty() {
        vec![runtime::labels::REFERENCE_TEMPLATES[0].to_string()]
    } else {
        a.templates.clone()
    };
    let inputs = RunInputs {
        init: &a.init,
        train: &train_set,
        test: &test_set,
        labels: &ds.labels,
        tokenizer: &tokenizer,
        preprocess: &cfg,
        device,
    };
    let mut results = Vec::new();
    let mut curves = Vec::new();
    for &lr in &a.lr {
        let opts = TrainOptions {
            adam: AdamConfig {
                lr,
                beta1: a.beta1,
                beta2: a.beta2,
                eps: a.eps,
                weight_decay: a.weight_decay,
            },
            batch_size: a.batch_size,
            epochs: a.epochs,
            seed: a.seed,
            loss: a.loss,
            freeze_vision: a.freeze_vision,
            freeze_text: a.freeze_text,
            templates: templates.clone(),
            mixed_precision: !a.no_mixed_precision,
            keep_checkpoints: a.keep_checkpoints,
            augment: a.augment,
        };
        let dir = if a.lr.len() == 1 {
            a.out.clone()
        } else {
            a.out.join(format!("lr-{lr:e}"))
        };
        if a.lr.len() > 1 {
            eprintln!("learning rate {lr:e} -> {}", dir.display());
        }
        let r = train::run(&opts, &inputs, &dir, a.resume)?;
        eprintln!(
            "best: epoch {} test top-1 {:.4} ({})",
            r.state.best_epoch,
            r.state.best_top1,
            r.best_checkpoint.display()
        );
        curves.push((format!("lr {lr:e}"), r.state.metrics.clone()));
        results.push(r);
    }
    if a.lr.len() > 1 {
        write_sweep(&a.out, &a.lr, &results, &curves)?;
    }
    if let Some(dir) = &a.export {
        let (i, best) = results
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.state.best_top1.total_cmp(&y.1.state.best_top1))
            .expect("one run at least");
        let training = serde_json::json!({
            "lr": a.lr[i], "epochs": a.epochs, "batch_size": a.batch_size, "weight_decay": a.weight_decay,
            "betas": [a.beta1, a.beta2], "eps": a.eps, "loss": a.loss, "seed": a.seed,
            "best_epoch": best.state.best_epoch, "train_images": train_set.len(), "test_images": test_set.len(),
        });
        let spec = ExportSpec {
            checkpoint: best.best_checkpoint.clone(),
            labels: ds.labels.clone(),
            templates: templates.clone(),
            precision: a.precision,
            name: a.bundle_name.clone().unwrap_or_else(|| {
                dir.file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| "bundle".into())
            }),
            description: if a.bundle_description.is_empty() {
                format!("fine-tuned on {}", ds.name)
            } else {
                a.bundle_description.clone()
            },
            without_text_encoder: a.no_text_encoder,
            provenance: runtime::bundle::Provenance {
                base_weights: export::base_weights(&a.init),
                dataset: ds.name.clone(),
                training,
                metrics: serde_json::json!({"test_top1": best.state.best_top1, "per_epoch": best.state.metrics}),
                license: a.bundle_license.clone(),
                notes: a.bundle_notes.clone(),
            },
        };
        let b = export::export(spec, dir)?;
        eprintln!(
            "exported {} (epoch {}, test top-1 {:.4})",
            b.dir.display(),
            best.state.best_epoch,
            best.state.best_top1
        );
    }
    Ok(results)
}

fn write_sweep(
    out: &Path,
    lrs: &[f64],
    results: &[train::RunResult],
    curves: &[(String, Vec<train::EpochMetrics>)],
) -> Result<()> {
    let mut csv = String::from("lr,epoch,train_loss,test_top1,seconds\n");
    for (lr, r) in lrs.iter().zip(results) {
        for m in &r.state.metrics {
            csv.push_str(&format!(
                "{lr:e},{},{},{},{:.3}\n",
                m.epoch, m.train_loss, m.test_top1, m.seconds
            ));
        }
    }
    runtime::fsutil::write_atomic(&out.join("metrics.csv"), csv.as_bytes())?;
    let json: Vec<_> = lrs
        .iter()
        .zip(results)
        .map(|(lr, r)| serde_json::json!({"lr": lr, "best_epoch": r.state.best_epoch, "best_test_top1": r.state.best_top1, "epochs": r.state.metrics}))
        .collect();
    runtime::fsutil::write_atomic(
        &out.join("metrics.json"),
        &serde_json::to_vec_pretty(&json).expect("json"),
    )?;
    crate::plot::curves(&out.join("curves.png"), curves)?;
    Ok(())
}

/// Labels from `unifesp`, `irma`, a file (one per line) or a comma-separated list.
pub fn parse_labels(spec: &str) -> Result<Vec<runtime::labels::Label>> {
    if let Some(set) = runtime::labels::builtin(spec.trim()) {
        return Ok(set);
    }
    let path = Path::new(spec);
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        return Ok(runtime::labels::from_list(text.lines())?);
    }
    Ok(runtime::labels::from_list(spec.split(','))?)
}

fn templates_or_default(t: &[String]) -> Vec<String> {
    if t.is_empty() {
        vec![runtime::labels::REFERENCE_TEMPLATES[0].to_string()]
    } else {
        t.to_vec()
    }
}

pub fn export_cmd(a: &ExportArgs) -> Result<()> {
    let labels = parse_labels(&a.labels)?;
    let spec = ExportSpec {
        checkpoint: a.checkpoint.clone(),
        labels,
        templates: templates_or_default(&a.templates),
        precision: a.precision,
        name: a.name.clone().unwrap_or_else(|| {
            a.out
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "bundle".into())
        }),
        description: String::new(),
        without_text_encoder: a.no_text_encoder,
        provenance: Default::default(),
    };
    let b = export::export(spec, &a.out)?;
    println!(
        "wrote {} ({} labels, {} dims, {:?})",
        b.dir.display(),
        b.manifest.labels.len(),
        b.manifest.embedding_dim,
        a.precision
    );
    Ok(())
}

pub fn predict(a: &PredictArgs) -> Result<bool> {
    let labels = parse_labels(&a.labels)?;
    let loaded = weights::load(&a.checkpoint, Device::Cpu)?;
    let tokenizer = ClipTokenizer::from_file(&export::checkpoint_tokenizer(&a.checkpoint))?;
    let per_template = templates_or_default(&a.templates)
        .iter()
        .map(|t| train::label_tokens(&tokenizer, &labels, t, Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let emb = train::label_embeddings(&loaded.model, &per_template);
    let scale = loaded.model.logit_scale.exp().double_value(&[]);
    let s = loaded.model.config.vision_config.image_size as u32;
    let cfg = PreprocessConfig {
        image_size: s,
        resize_shortest_edge: s,
        ..PreprocessConfig::default()
    };
    let files = runtime::pipeline::collect_files(&a.paths)?;
    let mut ok = true;
    for f in &files {
        let pixels = match runtime::pipeline::load_tensor(f, &cfg) {
            Ok(p) => p,
            Err(e) => {
                ok = false;
                eprintln!("error: {e}");
                continue;
            }
        };
        let x = tch::Tensor::from_slice(&pixels).view([1, 3, s as i64, s as i64]);
        let probs = tch::no_grad(|| {
            let img = crate::model::normalize(&loaded.model.image_features(&x));
            (img.matmul(&emb.tr()) * scale).softmax(-1, tch::Kind::Float)
        });
        let probs: Vec<f32> = Vec::<f32>::try_from(probs.reshape([-1])).map_err(Error::Torch)?;
        let k = a.top_k.clamp(1, labels.len());
        println!(
            "{}",
            runtime::scoring::json_line(&f.display().to_string(), &labels, &probs, k)
        );
    }
    Ok(ok)
}
