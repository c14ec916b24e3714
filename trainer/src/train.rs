//! Fine-tuning as the reference experiment: image and text encoders trained jointly with CLIP's
//! symmetric contrastive cross-entropy on (image, prompt of its label) pairs, Adam, batch 16; or the
//! class-aware loss (each image against every label prompt), which duplicate labels in a batch do not
//! confuse. Per epoch: train loss, zero-shot test top-1, time; a checkpoint; metrics and curves.

use std::path::{Path, PathBuf};
use std::time::Instant;

use runtime::labels::{self, Label};
use runtime::preprocess::PreprocessConfig;
use runtime::tokenizer::{ClipTokenizer, Padding};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::data::ImageSet;
use crate::error::{Error, Result};
use crate::model::{normalize, Clip};
use crate::optim::{Adam, AdamConfig, LossScaler};
use crate::weights;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// (CE(logits_per_image, arange) + CE(logits_per_text, arange)) / 2, as the reference.
    Contrastive,
    /// CE of each image against all label prompts.
    ClassAware,
}

impl std::str::FromStr for LossKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "contrastive" => Ok(LossKind::Contrastive),
            "class-aware" => Ok(LossKind::ClassAware),
            other => Err(format!(
                "unknown loss {other:?} (contrastive or class-aware)"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub adam: AdamConfig,
    pub batch_size: usize,
    pub epochs: usize,
    pub seed: u64,
    pub loss: LossKind,
    pub freeze_vision: bool,
    pub freeze_text: bool,
    /// The first template makes the training prompts; all of them (averaged) score the test set.
    pub templates: Vec<String>,
    /// fp16 autocast with loss scaling (CUDA only).
    pub mixed_precision: bool,
    /// Checkpoints kept besides the best one (the newest ones).
    pub keep_checkpoints: usize,
    /// Random contrast and brightness changes of the training images.
    #[serde(default)]
    pub augment: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            adam: AdamConfig::default(),
            batch_size: 16,
            epochs: 50,
            seed: 0,
            loss: LossKind::Contrastive,
            freeze_vision: false,
            freeze_text: false,
            templates: vec![labels::REFERENCE_TEMPLATES[0].to_string()],
            mixed_precision: true,
            keep_checkpoints: 2,
            augment: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub test_top1: f64,
    pub seconds: f64,
    pub steps: usize,
    /// Steps skipped by the fp16 loss scaler (gradient overflow).
    pub skipped_steps: usize,
}

/// What a run directory remembers between epochs (`checkpoints/epoch-NNN/state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    pub epoch: usize,
    pub metrics: Vec<EpochMetrics>,
    pub best_epoch: usize,
    pub best_top1: f64,
    pub loss_scale: f64,
}

pub struct RunResult {
    pub state: RunState,
    pub best_checkpoint: PathBuf,
}

/// Everything a run needs besides its options.
pub struct RunInputs<'a> {
    pub init: &'a Path,
    pub train: &'a ImageSet,
    pub test: &'a ImageSet,
    pub labels: &'a [Label],
    pub tokenizer: &'a ClipTokenizer,
    pub preprocess: &'a PreprocessConfig,
    pub device: Device,
}

pub fn checkpoint_dir(run_dir: &Path, epoch: usize) -> PathBuf {
    run_dir
        .join("checkpoints")
        .join(format!("epoch-{epoch:03}"))
}

/// The newest complete checkpoint of a run (checkpoints are renamed into place when complete).
pub fn latest_checkpoint(run_dir: &Path) -> Option<(usize, PathBuf)> {
    let dir = run_dir.join("checkpoints");
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("epoch-")?.parse::<usize>().ok()?;
            e.path().join("state.json").exists().then(|| (n, e.path()))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Token ids `[labels, len]` of every label in one template.
/// Refuses (instead of libtorch panicking) token ids the model has no embedding for.
pub fn label_tokens(
    tokenizer: &ClipTokenizer,
    labels: &[Label],
    template: &str,
    text: &crate::model::TextConfig,
    device: Device,
) -> Result<Tensor> {
    let prompts: Vec<String> = labels
        .iter()
        .map(|l| labels::fill(template, l))
        .collect::<runtime::Result<_>>()?;
    let b = tokenizer.encode_batch(&prompts, Padding::Longest)?;
    let top = b.ids.iter().copied().max().unwrap_or(0);
    if top >= text.vocab_size || b.len as i64 > text.max_position_embeddings {
        return Err(Error::Config(format!(
            "the tokenizer does not fit the model: token id {top} and {} tokens per prompt, the model has {} token embeddings and {} positions (use the tokenizer the weights came with)",
            b.len, text.vocab_size, text.max_position_embeddings
        )));
    }
    Ok(Tensor::from_slice(&b.ids)
        .view([b.batch as i64, b.len as i64])
        .to_device(device))
}

/// Normalised label embeddings `[labels, D]`, templates averaged after normalising.
pub fn label_embeddings(model: &Clip, per_template: &[Tensor]) -> Tensor {
    tch::no_grad(|| {
        let sum = per_template
            .iter()
            .map(|ids| normalize(&model.text_features(ids)))
            .reduce(|a, b| a + b)
            .expect("a template");
        normalize(&sum)
    })
}

/// Zero-shot top-1 on a set: a hit when the best label is any of the image's labels.
pub fn evaluate(
    model: &Clip,
    set: &ImageSet,
    label_emb: &Tensor,
    cfg: &PreprocessConfig,
    device: Device,
) -> Result<(f64, Vec<usize>)> {
    let mut predictions = Vec::with_capacity(set.len());
    tch::no_grad(|| {
        let idx: Vec<usize> = (0..set.len()).collect();
        for chunk in idx.chunks(64) {
            let img = normalize(
                &model
                    .image_features(&set.pixels(chunk, cfg, device))
                    .to_kind(Kind::Float),
            );
            let best = img
                .matmul(&label_emb.to_kind(Kind::Float).tr())
                .argmax(-1, false)
                .to_device(Device::Cpu);
            let best: Vec<i64> = Vec::<i64>::try_from(best).map_err(Error::Torch)?;
            predictions.extend(best.into_iter().map(|b| b as usize));
        }
        Ok::<(), Error>(())
    })?;
    let hits = predictions
        .iter()
        .zip(&set.all_labels)
        .filter(|(p, l)| l.contains(p))
        .count();
    Ok((hits as f64 / set.len() as f64, predictions))
}

/// CLIP's symmetric cross-entropy over a batch of (image, text) pairs.
pub fn contrastive_loss(model: &Clip, image_features: &Tensor, text_ids: &Tensor) -> Tensor {
    let txt = model.text_features(text_ids);
    let logits = model.logits(image_features, &txt).to_kind(Kind::Float);
    let targets = Tensor::arange(logits.size()[0], (Kind::Int64, logits.device()));
    (logits.cross_entropy_for_logits(&targets) + logits.tr().cross_entropy_for_logits(&targets))
        / 2.0
}

fn set_trainable(vs: &nn::VarStore, opts: &TrainOptions) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter()
        .filter_map(|(name, t)| {
            let vision =
                name.starts_with("vision_model.") || name.starts_with("visual_projection.");
            let text = name.starts_with("text_model.") || name.starts_with("text_projection.");
            let frozen = (vision && opts.freeze_vision) || (text && opts.freeze_text);
            let _ = t.set_requires_grad(!frozen);
            (!frozen).then_some((name, t))
        })
        .collect()
}

/// Trains (or resumes) one run in `run_dir`.
pub fn run(
    opts: &TrainOptions,
    inputs: &RunInputs,
    run_dir: &Path,
    resume: bool,
) -> Result<RunResult> {
    if opts.batch_size < 2 && opts.loss == LossKind::Contrastive {
        return Err(Error::Config(
            "the contrastive loss needs a batch size of at least 2".into(),
        ));
    }
    if opts.templates.is_empty() {
        return Err(Error::Config("no prompt template".into()));
    }
    let device = inputs.device;
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let (start, source) = match resume.then(|| latest_checkpoint(run_dir)).flatten() {
        Some((epoch, dir)) => (epoch, dir),
        None => (0, inputs.init.to_path_buf()),
    };
    let loaded = weights::load(&source, device)?;
    let (vs, model) = (loaded.vs, loaded.model);
    let mut state = if start > 0 {
        let path = source.join("state.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path,
            reason: e.to_string(),
        })?
    } else {
        RunState {
            loss_scale: 0.0,
            ..Default::default()
        }
    };
    let params = set_trainable(&vs, opts);
    if params.is_empty() {
        return Err(Error::Config(
            "both encoders are frozen: nothing to train".into(),
        ));
    }
    let mut adam = Adam::new(params, opts.adam);
    if start > 0 {
        adam.load(&source.join("optimizer.safetensors"))?;
    }
    let amp = opts.mixed_precision && device.is_cuda();
    let mut scaler = LossScaler::new(amp);
    if start > 0 && state.loss_scale > 0.0 {
        scaler.scale = state.loss_scale;
    }
    let train_tokens = label_tokens(
        inputs.tokenizer,
        inputs.labels,
        &opts.templates[0],
        &model.config.text_config,
        device,
    )?;
    let eval_tokens: Vec<Tensor> = opts
        .templates
        .iter()
        .map(|t| {
            label_tokens(
                inputs.tokenizer,
                inputs.labels,
                t,
                &model.config.text_config,
                device,
            )
        })
        .collect::<Result<_>>()?;
    let config_json = serde_json::json!({"options": opts, "model": model.config, "init": inputs.init, "device": format!("{device:?}")});
    runtime::fsutil::write_atomic(
        &run_dir.join("run.json"),
        &serde_json::to_vec_pretty(&config_json).expect("json"),
    )?;

    let n = inputs.train.len();
    let steps_per_epoch = n.div_ceil(opts.batch_size);
    let epochs_bar = crate::progress::bar(opts.epochs as u64, "epochs");
    epochs_bar.set_position(start as u64);
    for epoch in start + 1..=opts.epochs {
        let t0 = Instant::now();
        let mut order: Vec<usize> = (0..n).collect();
        runtime::datasets::shuffle(
            &mut order,
            opts.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
        );
        let batch_bar = crate::progress::bar(steps_per_epoch as u64, &format!("epoch {epoch}"));
        let (mut loss_sum, mut steps, mut skipped) = (0.0, 0usize, 0usize);
        for (step, idx) in order.chunks(opts.batch_size).enumerate() {
            if idx.len() < 2 && opts.loss == LossKind::Contrastive {
                continue; // a single pair has no negatives
            }
            let aug_seed = opts
                .augment
                .then_some(opts.seed ^ ((epoch as u64) << 32) ^ ((step as u64) << 8));
            let pixels = inputs
                .train
                .pixels_augmented(idx, inputs.preprocess, device, aug_seed);
            let labels: Vec<i64> = idx.iter().map(|&i| inputs.train.labels[i] as i64).collect();
            let labels = Tensor::from_slice(&labels).to_device(device);
            let loss = tch::autocast(amp, || {
                let img = model.image_features(&pixels);
                match opts.loss {
                    LossKind::Contrastive => {
                        let txt = model.text_features(&train_tokens.index_select(0, &labels));
                        let logits = model.logits(&img, &txt).to_kind(Kind::Float);
                        let targets = Tensor::arange(idx.len() as i64, (Kind::Int64, device));
                        (logits.cross_entropy_for_logits(&targets)
                            + logits.tr().cross_entropy_for_logits(&targets))
                            / 2.0
                    }
                    LossKind::ClassAware => {
                        let txt = model.text_features(&train_tokens);
                        model
                            .logits(&img, &txt)
                            .to_kind(Kind::Float)
                            .cross_entropy_for_logits(&labels)
                    }
                }
            });
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                return Err(Error::NonFiniteLoss {
                    epoch,
                    step: step + 1,
                    value,
                });
            }
            adam.zero_grad();
            (&loss * scaler.scale).backward();
            let applied = adam.step(1.0 / scaler.scale, amp);
            scaler.update(applied);
            if !applied {
                skipped += 1;
            }
            loss_sum += value;
            steps += 1;
            batch_bar.inc(1);
        }
        batch_bar.finish_and_clear();
        let label_emb = label_embeddings(&model, &eval_tokens);
        let (top1, _) = evaluate(&model, inputs.test, &label_emb, inputs.preprocess, device)?;
        let m = EpochMetrics {
            epoch,
            train_loss: if steps > 0 {
                loss_sum / steps as f64
            } else {
                f64::NAN
            },
            test_top1: top1,
            seconds: t0.elapsed().as_secs_f64(),
            steps,
            skipped_steps: skipped,
        };
        let line = format!(
            "epoch {epoch:>3}: loss {:.4}  test top-1 {:.4}  {:.1} s",
            m.train_loss, m.test_top1, m.seconds
        );
        if epochs_bar.is_hidden() {
            eprintln!("{line}");
        } else {
            epochs_bar.println(line);
        }
        state.metrics.push(m);
        state.epoch = epoch;
        if state.best_epoch == 0 || top1 > state.best_top1 {
            state.best_epoch = epoch;
            state.best_top1 = top1;
        }
        state.loss_scale = scaler.scale;
        let state_json = serde_json::to_vec_pretty(&state).expect("state serialises");
        weights::save_checkpoint(
            &checkpoint_dir(run_dir, epoch),
            &model.config,
            &vs,
            |staging| {
                let opt = staging.join("optimizer.safetensors");
                adam.save(&opt)?;
                weights::sync_file(&opt)?;
                // state.json last: its presence marks a complete checkpoint (latest_checkpoint).
                Ok(runtime::fsutil::write_atomic(
                    &staging.join("state.json"),
                    &state_json,
                )?)
            },
        )?;
        write_metrics(run_dir, &state, &format!("lr {:e}", opts.adam.lr))?;
        prune_checkpoints(run_dir, &state, opts.keep_checkpoints);
        epochs_bar.inc(1);
    }
    epochs_bar.finish_and_clear();
    write_metrics(run_dir, &state, &format!("lr {:e}", opts.adam.lr))?;
    let best = checkpoint_dir(run_dir, state.best_epoch);
    Ok(RunResult {
        state,
        best_checkpoint: best,
    })
}

fn prune_checkpoints(run_dir: &Path, state: &RunState, keep: usize) {
    let Ok(entries) = std::fs::read_dir(run_dir.join("checkpoints")) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("epoch-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if n != state.best_epoch && n + keep.max(1) <= state.epoch {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// `metrics.csv`, `metrics.json`, `best.json` and `curves.png` of one run.
pub fn write_metrics(run_dir: &Path, state: &RunState, label: &str) -> Result<()> {
    let mut csv = String::from("epoch,train_loss,test_top1,seconds,steps,skipped_steps\n");
    for m in &state.metrics {
        csv.push_str(&format!(
            "{},{},{},{:.3},{},{}\n",
            m.epoch, m.train_loss, m.test_top1, m.seconds, m.steps, m.skipped_steps
        ));
    }
    runtime::fsutil::write_atomic(&run_dir.join("metrics.csv"), csv.as_bytes())?;
    runtime::fsutil::write_atomic(
        &run_dir.join("metrics.json"),
        &serde_json::to_vec_pretty(&state.metrics).expect("json"),
    )?;
    let best = serde_json::json!({
        "epoch": state.best_epoch,
        "test_top1": state.best_top1,
        "checkpoint": format!("checkpoints/epoch-{:03}", state.best_epoch),
    });
    runtime::fsutil::write_atomic(
        &run_dir.join("best.json"),
        &serde_json::to_vec_pretty(&best).expect("json"),
    )?;
    crate::plot::curves(
        &run_dir.join("curves.png"),
        &[(label.to_string(), state.metrics.clone())],
    )?;
    Ok(())
}
