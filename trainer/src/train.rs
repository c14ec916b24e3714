//! Fine-tuning as the reference experiment: image and text encoders trained jointly with CLIP's
//! symmetric contrastive cross-entropy on (image, prompt of its label) pairs, Adam, batch 16; or the
//! class-aware loss (each image against every label prompt), which duplicate labels in a batch do not
//! confuse. Per epoch: train loss, zero-shot test top-1, time; a checkpoint; metrics and curves.

use std::path::{Path, PathBuf};
use std::time::Instant;

use runtime::image::preprocess::PreprocessConfig;
use runtime::text::labels::Label;
use runtime::text::tokenizer::ClipTokenizer;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::average::{self, WeightAverage};
use crate::data::ImageSet;
use crate::error::{Error, Result};
use crate::model::Clip;
use crate::optim::{Adam, AdamConfig, LossScaler, LrSchedule};
use crate::report::{self, EpochMetrics, FinalTest, RunState, Select};
use crate::weights;
use crate::zero_shot::{evaluate, label_embeddings, label_tokens, template_tokens, SetScores};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// (CE(logits_per_image, arange) + CE(logits_per_text, arange)) / 2, as the reference.
    Contrastive,
    /// CE of each image against all label prompts.
    ClassAware,
}

/// Training-time image augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    None,
    /// Random contrast and brightness (radiographs differ widely in windowing).
    Intensity,
    /// Intensity, plus a random rotation (+-10 deg), scale (0.87-1.18), shift (+-10%) and
    /// horizontal flip (left and right body parts share a label).
    Full,
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
    /// Keep the text encoder's token table as it is (see `finetune --freeze-token-embedding`).
    #[serde(default)]
    pub freeze_token_embedding: bool,
    /// The templates (averaged) that score the validation and test images and make the bundle.
    pub templates: Vec<String>,
    /// The template of the training text (`{}`: the bare label name, as the reference experiment).
    #[serde(default)]
    pub train_template: String,
    /// fp16 autocast with loss scaling (CUDA only).
    pub mixed_precision: bool,
    /// Checkpoints kept besides the best one (the newest ones).
    pub keep_checkpoints: usize,
    #[serde(default = "no_augment")]
    pub augment: Augment,
    #[serde(default = "constant")]
    pub schedule: LrSchedule,
    #[serde(default)]
    pub warmup_epochs: usize,
    #[serde(default = "select_last")]
    pub select: Select,
    /// Draw each batch with equal chances per class (sampling with replacement).
    #[serde(default)]
    pub balanced: bool,
    /// Score the test images after every epoch too (the reference experiment did; the choice of
    /// the model never looks at them).
    #[serde(default)]
    pub monitor_test: bool,
    /// Validation and test (and the saved model: its config, hence the export) average each
    /// image's embedding with its mirror's (`model::VisionConfig::test_time_flip`).
    pub test_time_flip: bool,
    /// Decay per step of an exponential moving average of the weights that is validated, kept in
    /// the checkpoints and exported instead of the live weights (None: the live weights).
    #[serde(default)]
    pub weight_average: Option<f64>,
    /// Class-aware loss: the share of each target spread evenly over all labels (0: none).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Class-aware loss: mixup with this Beta(alpha, alpha) (None: off); see [`mixup`].
    #[serde(default)]
    pub mixup: Option<f64>,
    /// Class-aware loss: logit adjustment (Menon et al. 2021), `tau * ln(prior)` of each label's
    /// share of the training rows added to the training logits only (0: off); see
    /// [`logit_offsets`].
    #[serde(default)]
    pub logit_adjust: f64,
    /// The chance that an image of a training batch gets a random rectangle erased (0: off); see
    /// [`random_erase`].
    #[serde(default)]
    pub random_erase: f64,
}

fn no_augment() -> Augment {
    Augment::None
}
fn constant() -> LrSchedule {
    LrSchedule::Constant
}
fn select_last() -> Select {
    Select::Last
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
            freeze_token_embedding: false,
            templates: runtime::text::prompts::default_templates(),
            train_template: runtime::text::prompts::DEFAULT_TEMPLATE.to_string(),
            mixed_precision: true,
            keep_checkpoints: 2,
            augment: Augment::None,
            schedule: LrSchedule::Constant,
            warmup_epochs: 0,
            select: Select::Last,
            balanced: false,
            monitor_test: false,
            test_time_flip: false,
            weight_average: None,
            label_smoothing: 0.0,
            mixup: None,
            logit_adjust: 0.0,
            random_erase: 0.0,
        }
    }
}

pub struct RunResult {
    pub state: RunState,
    /// The selected checkpoint (best validation epoch, or the last).
    pub best_checkpoint: PathBuf,
    pub test: FinalTest,
}

impl RunResult {
    /// The selected model's validation top-1 (none without validation rows).
    pub fn val_top1(&self) -> Option<f64> {
        self.state
            .epoch_metrics(self.test.epoch)
            .and_then(|m| m.val_top1)
    }

    /// What a sweep compares runs by: the selected model's validation top-1, else (no validation
    /// rows) test top-1.
    pub fn score(&self) -> f64 {
        self.val_top1().unwrap_or(self.test.top1)
    }
}

/// Everything a run needs besides its options.
pub struct RunInputs<'a> {
    pub init: &'a Path,
    pub train: &'a ImageSet,
    /// Validation rows (part of the training rows), if any: they choose the epoch.
    pub val: Option<&'a ImageSet>,
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

fn set_trainable(vs: &nn::VarStore, opts: &TrainOptions) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter()
        .filter(|(name, _)| !crate::model::is_running_stat(name))
        .filter_map(|(name, t)| {
            let vision = crate::model::is_vision_variable(&name);
            let text = name.starts_with("text_model.") || name.starts_with("text_projection.");
            let frozen = (vision && opts.freeze_vision)
                || (text && opts.freeze_text)
                || (opts.freeze_token_embedding && crate::model::is_token_embedding(&name));
            let _ = t.set_requires_grad(!frozen);
            (!frozen).then_some((name, t))
        })
        .collect()
}

/// The order of one epoch's training images: a seeded shuffle, or with `balanced` as many draws
/// (with replacement) with equal chances per class.
fn epoch_order(labels: &[usize], seed: u64, balanced: bool) -> Vec<usize> {
    let n = labels.len();
    if !balanced {
        let mut order: Vec<usize> = (0..n).collect();
        runtime::eval::datasets::shuffle(&mut order, seed);
        return order;
    }
    let mut by_class: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    let classes: Vec<&Vec<usize>> = by_class.values().collect();
    let mut rng = runtime::eval::datasets::SplitMix64::new(seed ^ 0x5851_F42D_4C95_7F2D);
    (0..n)
        .map(|_| {
            let members = classes[(rng.next_f64() * classes.len() as f64) as usize % classes.len()];
            members[(rng.next_f64() * members.len() as f64) as usize % members.len()]
        })
        .collect()
}

/// Random rotation, scale, shift and horizontal flip of a batch `[n, 3, S, S]` (bilinear, border
/// pixels repeated), the same for a given seed.
pub fn geometric_jitter(pixels: &Tensor, seed: u64) -> Tensor {
    let n = pixels.size()[0];
    let mut rng = runtime::eval::datasets::SplitMix64::new(seed ^ 0x2545_F491_4F6C_DD1D);
    let mut theta = Vec::with_capacity(n as usize * 6);
    for _ in 0..n {
        let mut u = || rng.next_f64() * 2.0 - 1.0;
        let angle = u() * 10f64.to_radians();
        let scale = 1.0 / (1.0 + 0.15 * u());
        let (tx, ty) = (0.1 * u(), 0.1 * u());
        let flip = if u() < 0.0 { -1.0 } else { 1.0 };
        let (c, s) = (scale * angle.cos(), scale * angle.sin());
        theta.extend_from_slice(&[
            (c * flip) as f32,
            -s as f32,
            tx as f32,
            (s * flip) as f32,
            c as f32,
            ty as f32,
        ]);
    }
    let theta = Tensor::from_slice(&theta)
        .view([n, 2, 3])
        .to_device(pixels.device())
        .to_kind(pixels.kind());
    let grid = Tensor::affine_grid_generator(&theta, pixels.size(), false);
    // interpolation 0 = bilinear, padding 1 = border
    pixels.grid_sampler(&grid, 0, 1, false)
}

/// Random erasing (Zhong et al. 2020; timm's `RandomErasing`): with chance `p` an image gets
/// one rectangle of 2-33% of its area, aspect ratio log-uniform in 0.3-3.3, set to 0 (the
/// normalised mean grey), so the model cannot lean on one region alone. Seeded: the same seed
/// erases the same rectangles.
pub fn random_erase(pixels: &Tensor, p: f64, seed: u64) -> Tensor {
    let size = pixels.size();
    let (n, h, w) = (size[0], size[2], size[3]);
    let mut rng = runtime::eval::datasets::SplitMix64::new(seed ^ 0x3C6E_F372_FE94_F82B);
    let mut keep = vec![1f32; (n * h * w) as usize];
    for image in keep.chunks_mut((h * w) as usize) {
        if rng.next_f64() >= p {
            continue;
        }
        // timm's recipe: up to 10 draws for a rectangle that fits, else the image stays whole.
        for _ in 0..10 {
            let area = (0.02 + rng.next_f64() * (1.0 / 3.0 - 0.02)) * (h * w) as f64;
            let aspect = (0.3f64.ln() + rng.next_f64() * (0.3f64.ln().abs() * 2.0)).exp();
            let (eh, ew) = (
                (area * aspect).sqrt().round() as i64,
                (area / aspect).sqrt().round() as i64,
            );
            if eh < 1 || ew < 1 || eh >= h || ew >= w {
                continue;
            }
            let top = (rng.next_f64() * (h - eh + 1) as f64) as i64;
            let left = (rng.next_f64() * (w - ew + 1) as f64) as i64;
            for y in top..top + eh {
                let row = (y * w) as usize;
                image[row + left as usize..row + (left + ew) as usize].fill(0.0);
            }
            break;
        }
    }
    let keep = Tensor::from_slice(&keep)
        .view([n, 1, h, w])
        .to_device(pixels.device())
        .to_kind(pixels.kind());
    pixels * keep
}

/// What the class-aware loss adds to plain cross-entropy (see [`train_step`]).
#[derive(Default)]
pub struct ClassAwareLoss<'a> {
    /// The share of each target spread evenly over all labels.
    pub label_smoothing: f64,
    /// Blends the losses against the labels of the mixed images' two sources.
    pub mix: Option<&'a Mix>,
    /// `[labels]`, added to each image's logits before the loss (logit adjustment).
    pub logit_offsets: Option<&'a Tensor>,
}

/// `tau * ln(share)` per label, the share of the training rows with that label (a label absent
/// from them counts once, so its offset stays finite): added to the training logits, it makes the
/// loss (and so the model's plain logits) aim at balanced accuracy instead of following the
/// training rows' label frequencies (Menon et al., "Long-tail learning via logit adjustment",
/// 2021). Rare labels need larger margins to win in training, so they win more often in use.
pub fn logit_offsets(labels: &[usize], num_labels: usize, tau: f64) -> Vec<f32> {
    let mut counts = vec![0usize; num_labels];
    for &l in labels {
        counts[l] += 1;
    }
    let total = labels.len().max(1) as f64;
    counts
        .iter()
        .map(|&c| (tau * (c.max(1) as f64 / total).ln()) as f32)
        .collect()
}

/// A batch blended with a shuffled copy of itself (mixup, Zhang et al. 2018): image `i` becomes
/// `lambda * x[i] + (1 - lambda) * x[partner[i]]` and its loss the same blend of the losses
/// against both labels.
pub struct Mix {
    pub lambda: f64,
    /// `[n]` int64: the index of each image's partner in the batch.
    pub partner: Tensor,
}

/// Mixes a batch `[n, 3, S, S]` with `lambda ~ Beta(alpha, alpha)` and a random pairing, the same
/// for a given seed (resumed runs stay exact).
pub fn mixup(pixels: &Tensor, alpha: f64, seed: u64) -> Result<(Tensor, Mix)> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let beta = rand_distr::Beta::new(alpha, alpha)
        .map_err(|e| Error::Usage(format!("--mixup {alpha}: {e}")))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6A09_E667_F3BC_C909);
    let lambda = beta.sample(&mut rng);
    let n = pixels.size()[0];
    let mut partner: Vec<i64> = (0..n).collect();
    runtime::eval::datasets::shuffle(&mut partner, seed);
    let partner = Tensor::from_slice(&partner).to_device(pixels.device());
    let mixed = pixels * lambda + pixels.index_select(0, &partner) * (1.0 - lambda);
    Ok((mixed, Mix { lambda, partner }))
}

/// Keeps `state.best_epoch` on the best epoch so far: the higher validation top-1, ties to the
/// lower validation loss (on a hundred rows top-1 moves by whole images and ties for many epochs;
/// the loss still tells a model that kept improving from an early lucky one); without validation
/// rows, the newest epoch. `epoch`'s metrics are already in `state.metrics`.
fn update_best(state: &mut RunState, epoch: usize, top1: Option<f64>, loss: Option<f64>) {
    let Some(top1) = top1 else {
        state.best_epoch = epoch;
        return;
    };
    let better = match state.best_val_top1 {
        None => true,
        Some(best) => {
            let best_loss = state
                .metrics
                .iter()
                .find(|m| m.epoch == state.best_epoch)
                .and_then(|m| m.val_loss);
            top1 > best
                || (top1 == best && matches!((loss, best_loss), (Some(l), Some(b)) if l < b))
        }
    };
    if better {
        state.best_epoch = epoch;
        state.best_val_top1 = Some(top1);
    }
}

/// Trains (or resumes) one run in `run_dir`; at the end the selected epoch (best validation
/// top-1, or the last) scores the test images once.
pub fn run(
    opts: &TrainOptions,
    inputs: &RunInputs,
    run_dir: &Path,
    resume: bool,
) -> Result<RunResult> {
    if opts.batch_size < 2 && opts.loss == LossKind::Contrastive {
        return Err(Error::Usage(
            "the contrastive loss needs a batch size of at least 2".into(),
        ));
    }
    if opts.templates.is_empty() {
        return Err(Error::Usage("no prompt template".into()));
    }
    if opts.select == Select::BestVal && inputs.val.is_none() {
        return Err(Error::Usage(
            "--select best-val needs validation rows (--val FRACTION)".into(),
        ));
    }
    let device = inputs.device;
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let (start, source) = match resume.then(|| latest_checkpoint(run_dir)).flatten() {
        Some((epoch, dir)) => (epoch, dir),
        None => (0, inputs.init.to_path_buf()),
    };
    if start > 0 {
        eprintln!(
            "resuming {} after epoch {start} (checkpoint {}), to epoch {}",
            run_dir.display(),
            source.display(),
            opts.epochs
        );
    }
    let loaded = weights::load(&source, device)?;
    let (vs, mut model) = (loaded.vs, loaded.model);
    model.config.vision_config.test_time_flip = opts.test_time_flip;
    let run_crop = model.config.vision_config.crop;
    if start > 0 && run_crop != inputs.preprocess.crop {
        // The images would be prepared otherwise than the checkpoints were trained on.
        return Err(Error::Usage(format!(
            "{} was trained with --crop {run_crop}; resume it with --crop {run_crop}",
            run_dir.display()
        )));
    }
    model.config.vision_config.crop = inputs.preprocess.crop;
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
        return Err(Error::Usage(
            "both encoders are frozen: nothing to train".into(),
        ));
    }
    let mut adam = Adam::new(params, opts.adam);
    if start > 0 {
        adam.load(&source.join("optimizer.safetensors"))?;
    }
    // A checkpoint's model is the average; its live weights, to train on from, lie beside it.
    let mut average = opts
        .weight_average
        .map(|decay| WeightAverage::new(&vs, decay, state.average_updates));
    if let (Some(avg), true) = (&average, start > 0) {
        avg.load_into_model(&source.join(average::LIVE_WEIGHTS))?;
    }
    let amp = opts.mixed_precision && device.is_cuda();
    let mut scaler = LossScaler::new(amp);
    if start > 0 && state.loss_scale > 0.0 {
        scaler.scale = state.loss_scale;
    }
    let train_template = if opts.train_template.is_empty() {
        &opts.templates[0]
    } else {
        &opts.train_template
    };
    let train_tokens = label_tokens(
        inputs.tokenizer,
        inputs.labels,
        train_template,
        &model.config.text_config,
        device,
    )?;
    let eval_tokens = template_tokens(
        inputs.tokenizer,
        inputs.labels,
        &opts.templates,
        &model.config.text_config,
        device,
    )?;
    let config_json = serde_json::json!({"options": opts, "model": model.config, "init": inputs.init, "device": crate::device::name(device)});
    runtime::fs::write_atomic(
        &run_dir.join("run.json"),
        &serde_json::to_vec_pretty(&config_json).expect("json"),
    )?;

    let offsets = (opts.logit_adjust != 0.0).then(|| {
        let o = logit_offsets(&inputs.train.labels, inputs.labels.len(), opts.logit_adjust);
        Tensor::from_slice(&o).to_device(device)
    });
    let n = inputs.train.len();
    let steps_per_epoch = n.div_ceil(opts.batch_size);
    let base_lr = opts.adam.lr;
    let epochs_bar = runtime::progress::bar(opts.epochs as u64, "epochs");
    epochs_bar.set_position(start as u64);
    for epoch in start + 1..=opts.epochs {
        let t0 = Instant::now();
        let order = epoch_order(
            &inputs.train.labels,
            opts.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
            opts.balanced,
        );
        let batch_bar = runtime::progress::bar(steps_per_epoch as u64, &format!("epoch {epoch}"));
        let (mut loss_sum, mut steps, mut skipped) = (0.0, 0usize, 0usize);
        for (step, idx) in order.chunks(opts.batch_size).enumerate() {
            let global_step = (epoch - 1) * steps_per_epoch + step;
            adam.config.lr = opts.schedule.lr(
                base_lr,
                global_step,
                steps_per_epoch,
                opts.epochs,
                opts.warmup_epochs,
            );
            if idx.len() < 2 && opts.loss == LossKind::Contrastive {
                continue; // a single pair has no negatives
            }
            let aug_seed = opts.seed ^ ((epoch as u64) << 32) ^ ((step as u64) << 8);
            let mut pixels = inputs.train.pixels_augmented(
                idx,
                inputs.preprocess,
                device,
                (opts.augment != Augment::None).then_some(aug_seed),
            );
            if opts.augment == Augment::Full {
                pixels = geometric_jitter(&pixels, aug_seed);
            }
            if opts.random_erase > 0.0 {
                pixels = random_erase(&pixels, opts.random_erase, aug_seed);
            }
            let mix = match opts.mixup {
                Some(alpha) if opts.loss == LossKind::ClassAware => {
                    let (mixed, mix) = mixup(&pixels, alpha, aug_seed)?;
                    pixels = mixed;
                    Some(mix)
                }
                _ => None,
            };
            let labels: Vec<i64> = idx.iter().map(|&i| inputs.train.labels[i] as i64).collect();
            let labels = Tensor::from_slice(&labels).to_device(device);
            let (value, applied) = train_step(
                &model,
                &mut adam,
                &mut scaler,
                opts.loss,
                &pixels,
                &labels,
                &train_tokens,
                &ClassAwareLoss {
                    label_smoothing: opts.label_smoothing,
                    mix: mix.as_ref(),
                    logit_offsets: offsets.as_ref(),
                },
                amp,
            );
            if !value.is_finite() {
                return Err(Error::NonFiniteLoss {
                    epoch,
                    step: step + 1,
                    value,
                });
            }
            if applied {
                if let Some(avg) = &mut average {
                    avg.update();
                }
            } else {
                skipped += 1;
            }
            loss_sum += value;
            steps += 1;
            batch_bar.inc(1);
        }
        batch_bar.finish_and_clear();
        // How what `model` holds now scores `set`, when there is one.
        let score = |set: Option<&ImageSet>, label_emb: &Tensor| -> Result<Option<SetScores>> {
            set.map(|s| evaluate(&model, s, label_emb, inputs.preprocess, device))
                .transpose()
        };
        // From here to the checkpoint's end the model holds the average (when there is one).
        let val_top1_live = match &mut average {
            Some(avg) => {
                let live = match inputs.val {
                    Some(_) => {
                        score(inputs.val, &label_embeddings(&model, &eval_tokens))?.map(|s| s.top1)
                    }
                    None => None,
                };
                avg.swap();
                live
            }
            None => None,
        };
        let label_emb = label_embeddings(&model, &eval_tokens);
        let val = score(inputs.val, &label_emb)?;
        let (val_top1, val_loss) = (val.as_ref().map(|v| v.top1), val.map(|v| v.loss));
        let test_top1 =
            score(opts.monitor_test.then_some(inputs.test), &label_emb)?.map(|t| t.top1);
        let m = EpochMetrics {
            epoch,
            train_loss: if steps > 0 {
                loss_sum / steps as f64
            } else {
                f64::NAN
            },
            lr: adam.config.lr,
            val_top1,
            val_loss,
            test_top1,
            val_top1_live,
            seconds: t0.elapsed().as_secs_f64(),
            steps,
            skipped_steps: skipped,
        };
        let mut line = format!(
            "epoch {epoch:>3}: loss {:.4}  lr {:.2e}",
            m.train_loss, m.lr
        );
        if let Some(v) = val_top1 {
            line.push_str(&format!("  val top-1 {v:.4}"));
        }
        if let Some(v) = val_top1_live {
            line.push_str(&format!(" (live weights {v:.4})"));
        }
        if let Some(v) = val_loss {
            line.push_str(&format!("  val loss {v:.4}"));
        }
        if let Some(t) = test_top1 {
            line.push_str(&format!("  test top-1 {t:.4}"));
        }
        line.push_str(&format!("  {:.1} s", m.seconds));
        if epochs_bar.is_hidden() {
            eprintln!("{line}");
        } else {
            epochs_bar.println(line);
        }
        state.metrics.push(m);
        state.epoch = epoch;
        update_best(&mut state, epoch, val_top1, val_loss);
        state.loss_scale = scaler.scale;
        state.average_updates = average.as_ref().map_or(0, |a| a.updates);
        let state_json = serde_json::to_vec_pretty(&state).expect("state serialises");
        weights::save_checkpoint(
            &checkpoint_dir(run_dir, epoch),
            &model.config,
            &vs,
            |staging| {
                let opt = staging.join("optimizer.safetensors");
                adam.save(&opt)?;
                weights::sync_file(&opt)?;
                if let Some(avg) = &average {
                    let live = staging.join(average::LIVE_WEIGHTS);
                    avg.save_held(&live)?;
                    weights::sync_file(&live)?;
                }
                // state.json last: its presence marks a complete checkpoint (latest_checkpoint).
                Ok(runtime::fs::write_atomic(
                    &staging.join("state.json"),
                    &state_json,
                )?)
            },
        )?;
        if let Some(avg) = &mut average {
            avg.swap();
        }
        report::write_metrics(run_dir, &state, None, &format!("lr {base_lr:e}"))?;
        prune_checkpoints(run_dir, &state, opts.keep_checkpoints);
        epochs_bar.inc(1);
    }
    epochs_bar.finish_and_clear();
    let selected = match opts.select {
        Select::BestVal => state.best_epoch,
        Select::Last => state.epoch,
    };
    let selected_dir = checkpoint_dir(run_dir, selected);
    // The test images are scored once, by the selected model.
    if selected != state.epoch || average.is_some() {
        assign_checkpoint(&vs, &selected_dir)?;
    }
    let label_emb = label_embeddings(&model, &eval_tokens);
    let scores = evaluate(&model, inputs.test, &label_emb, inputs.preprocess, device)?;
    let test = FinalTest {
        epoch: selected,
        select: opts.select,
        top1: scores.top1,
        images: inputs.test.len(),
        predictions: scores.predictions,
    };
    report::write_metrics(run_dir, &state, Some(&test), &format!("lr {base_lr:e}"))?;
    Ok(RunResult {
        state,
        best_checkpoint: selected_dir,
        test,
    })
}

/// One optimisation step of `finetune` (and of the training-step benchmark): forward under fp16
/// autocast when `amp`, the loss, the scaled backward pass and the Adam step. `tokens` holds one
/// prompt per label; `labels` the batch's label indices; `class_aware` what the class-aware loss
/// adds (the contrastive loss ignores it). Returns the loss and whether the
/// step was applied (the loss scaler skips steps whose gradients overflowed); a non-finite loss is
/// returned without a step.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &Clip,
    adam: &mut Adam,
    scaler: &mut LossScaler,
    loss: LossKind,
    pixels: &Tensor,
    labels: &Tensor,
    tokens: &Tensor,
    class_aware: &ClassAwareLoss,
    amp: bool,
) -> (f64, bool) {
    let loss = tch::autocast(amp, || {
        let img = model.image_features_t(pixels, true);
        match loss {
            LossKind::Contrastive => {
                let txt = model.text_features(&tokens.index_select(0, labels));
                let logits = model.logits(&img, &txt).to_kind(Kind::Float);
                let targets = Tensor::arange(logits.size()[0], (Kind::Int64, logits.device()));
                (logits.cross_entropy_for_logits(&targets)
                    + logits.tr().cross_entropy_for_logits(&targets))
                    / 2.0
            }
            LossKind::ClassAware => {
                let txt = model.text_features(tokens);
                let mut logits = model.logits(&img, &txt).to_kind(Kind::Float);
                if let Some(offsets) = class_aware.logit_offsets {
                    logits += offsets;
                }
                let ce = |targets: &Tensor| {
                    logits.cross_entropy_loss::<Tensor>(
                        targets,
                        None,
                        tch::Reduction::Mean,
                        -100,
                        class_aware.label_smoothing,
                    )
                };
                match class_aware.mix {
                    None => ce(labels),
                    Some(m) => {
                        ce(labels) * m.lambda
                            + ce(&labels.index_select(0, &m.partner)) * (1.0 - m.lambda)
                    }
                }
            }
        }
    });
    let value = loss.double_value(&[]);
    if !value.is_finite() {
        return (value, false);
    }
    adam.zero_grad();
    (&loss * scaler.scale).backward();
    let applied = adam.step(1.0 / scaler.scale, amp);
    scaler.update(applied);
    (value, applied)
}

/// Loads a checkpoint's weights into the variables of `vs`.
fn assign_checkpoint(vs: &nn::VarStore, dir: &Path) -> Result<()> {
    weights::assign(
        vs,
        weights::read_safetensors(dir)?,
        &dir.join(weights::WEIGHTS),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_epoch_breaks_top1_ties_by_the_lower_validation_loss() {
        let mut state = RunState {
            epoch: 0,
            metrics: Vec::new(),
            best_epoch: 0,
            best_val_top1: None,
            loss_scale: 1.0,
            average_updates: 0,
        };
        // (top-1, loss) of epochs 1-6: 2 is better on top-1; 3 ties it with a lower loss; 4 ties 3
        // with a higher loss; 5 has the lowest loss but a lower top-1; 6 ties 3 with a lower loss.
        let epochs = [
            (0.80, 0.50),
            (0.90, 0.45),
            (0.90, 0.40),
            (0.90, 0.42),
            (0.85, 0.30),
            (0.90, 0.39),
        ];
        let mut chosen = Vec::new();
        for (i, &(top1, loss)) in epochs.iter().enumerate() {
            let epoch = i + 1;
            state.metrics.push(EpochMetrics {
                epoch,
                train_loss: 1.0,
                lr: 1e-3,
                val_top1: Some(top1),
                val_loss: Some(loss),
                test_top1: None,
                val_top1_live: None,
                seconds: 1.0,
                steps: 1,
                skipped_steps: 0,
            });
            update_best(&mut state, epoch, Some(top1), Some(loss));
            chosen.push(state.best_epoch);
        }
        assert_eq!(chosen, [1, 2, 3, 3, 3, 6]);
        assert_eq!(state.best_val_top1, Some(0.90));
        // Without validation rows: the newest epoch.
        update_best(&mut state, 7, None, None);
        assert_eq!(state.best_epoch, 7);
    }

    /// Random erasing zeroes one rectangle, alike in every channel, in about p of the images, and
    /// repeats itself for a seed.
    #[test]
    fn random_erase_zeroes_one_seeded_rectangle_per_chosen_image() {
        let x = Tensor::ones([64, 3, 16, 16], (Kind::Float, Device::Cpu));
        let erased = random_erase(&x, 0.5, 7);
        assert!(erased.equal(&random_erase(&x, 0.5, 7)), "seeded");
        assert!(!erased.equal(&random_erase(&x, 0.5, 8)));
        assert!(
            random_erase(&x, 0.0, 7).equal(&x),
            "p = 0 keeps every image"
        );
        let mut touched = 0;
        for i in 0..64 {
            let image = erased.get(i);
            // The same pixels of every channel, and only zeros or the original ones.
            assert!(image.get(0).equal(&image.get(1)) && image.get(0).equal(&image.get(2)));
            let zeros = i64::try_from(image.get(0).eq(0.0).sum(Kind::Int64)).unwrap();
            assert_eq!(
                zeros + i64::try_from(image.get(0).eq(1.0).sum(Kind::Int64)).unwrap(),
                256
            );
            if zeros == 0 {
                continue;
            }
            touched += 1;
            // One rectangle of 2-33% of the area: its rows and columns span exactly `zeros`.
            let mask = image.get(0).eq(0.0);
            let rows = i64::try_from(mask.any_dim(1, false).sum(Kind::Int64)).unwrap();
            let cols = i64::try_from(mask.any_dim(0, false).sum(Kind::Int64)).unwrap();
            assert_eq!(rows * cols, zeros, "image {i}: not one rectangle");
            assert!(
                (3..=110).contains(&zeros),
                "image {i}: {zeros} of 256 pixels"
            );
        }
        assert!(
            (20..=44).contains(&touched),
            "{touched} of 64 images erased at p = 0.5"
        );
        let all = random_erase(&x, 1.0, 3).view([64, -1]).amin(1, false);
        assert!(
            all.eq(0.0).all().int64_value(&[]) == 1,
            "p = 1 erases every image"
        );
    }

    /// mixup blends each image with its partner by lambda, pairs by a permutation, and repeats
    /// itself for a seed (resumed runs stay exact).
    #[test]
    fn mixup_blends_by_a_seeded_pairing() {
        let x = Tensor::arange(6 * 3 * 2 * 2, (Kind::Float, Device::Cpu)).view([6, 3, 2, 2]);
        let (mixed, mix) = mixup(&x, 0.4, 17).unwrap();
        assert!(mix.lambda > 0.0 && mix.lambda < 1.0, "{}", mix.lambda);
        let mut partner = Vec::<i64>::try_from(&mix.partner).unwrap();
        let expected = &x * mix.lambda + x.index_select(0, &mix.partner) * (1.0 - mix.lambda);
        assert!(mixed.allclose(&expected, 1e-6, 1e-6, false));
        partner.sort();
        assert_eq!(partner, (0..6).collect::<Vec<i64>>());
        let (again, mix2) = mixup(&x, 0.4, 17).unwrap();
        assert_eq!(mix2.lambda, mix.lambda);
        assert!(again.equal(&mixed));
        let (_, other) = mixup(&x, 0.4, 18).unwrap();
        assert_ne!(other.lambda, mix.lambda);
        // Over many seeds the weights spread over (0, 1) as Beta(0.4, 0.4) does: mean 1/2.
        let lambdas: Vec<f64> = (0..400)
            .map(|s| mixup(&x, 0.4, s).unwrap().1.lambda)
            .collect();
        let mean = lambdas.iter().sum::<f64>() / lambdas.len() as f64;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
        assert!(lambdas.iter().any(|&l| l < 0.1) && lambdas.iter().any(|&l| l > 0.9));
    }

    #[test]
    fn logit_offsets_are_tau_times_the_log_share_of_each_label() {
        let o = logit_offsets(&[0, 0, 0, 1], 3, 0.5);
        let expect = [
            0.5 * (0.75f64).ln(),
            0.5 * (0.25f64).ln(),
            0.5 * (0.25f64).ln(),
        ];
        for (got, want) in o.iter().zip(expect) {
            assert!((*got as f64 - want).abs() < 1e-6, "{o:?}");
        }
    }

    /// A rn-tiny model whose optimiser steps at lr 0 (so the weights stay as they are and every
    /// loss it returns is of one model), a batch of random images and three one-token prompts.
    struct FixedModel {
        _vs: nn::VarStore,
        model: crate::model::Clip,
        adam: crate::optim::Adam,
        scaler: crate::optim::LossScaler,
        pixels: Tensor,
        tokens: Tensor,
    }

    impl FixedModel {
        fn new(seed: i64, batch: i64) -> Self {
            use crate::model::{Clip, ClipConfig};
            use crate::optim::{Adam, AdamConfig, LossScaler};
            tch::manual_seed(seed);
            let config = ClipConfig::preset("rn-tiny").unwrap();
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Clip::new(&vs.root(), &config);
            let params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            let adam = Adam::new(
                params,
                AdamConfig {
                    lr: 0.0,
                    ..AdamConfig::default()
                },
            );
            let s = config.vision_config.image_size;
            FixedModel {
                _vs: vs,
                model,
                adam,
                scaler: LossScaler::new(false),
                pixels: Tensor::randn([batch, 3, s, s], (Kind::Float, Device::Cpu)),
                tokens: Tensor::from_slice(&[
                    49406i64, 320, 49407, 49406, 321, 49407, 49406, 322, 49407,
                ])
                .view([3, 3]),
            }
        }

        /// The class-aware loss of one step against `labels`.
        fn loss(&mut self, labels: &Tensor, extras: &ClassAwareLoss) -> f64 {
            let (value, applied) = train_step(
                &self.model,
                &mut self.adam,
                &mut self.scaler,
                LossKind::ClassAware,
                &self.pixels,
                labels,
                &self.tokens,
                extras,
                false,
            );
            assert!(applied);
            value
        }
    }

    /// Offsets shift the training logits: the same for every label, the loss stays (softmax
    /// ignores a common shift); raised for the true labels, the loss falls.
    #[test]
    fn logit_offsets_shift_the_class_aware_loss() {
        let mut fixed = FixedModel::new(5, 3);
        let labels = Tensor::from_slice(&[0i64, 0, 0]);
        let mut loss = |offsets: Option<&Tensor>| {
            let extras = ClassAwareLoss {
                logit_offsets: offsets,
                ..Default::default()
            };
            fixed.loss(&labels, &extras)
        };
        let plain = loss(None);
        let shifted = loss(Some(&Tensor::from_slice(&[-2.0f32, -2.0, -2.0])));
        let favoured = loss(Some(&Tensor::from_slice(&[1.0f32, 0.0, 0.0])));
        assert!((plain - shifted).abs() < 1e-5, "{plain} vs {shifted}");
        assert!(favoured < plain - 0.1, "{favoured} vs {plain}");
    }

    /// A mixed batch's loss is the lambda blend of its losses against both label sets.
    #[test]
    fn mixed_loss_blends_the_two_label_losses() {
        let mut fixed = FixedModel::new(3, 4);
        let labels = Tensor::from_slice(&[0i64, 1, 2, 1]);
        let mix = Mix {
            lambda: 0.3,
            partner: Tensor::from_slice(&[2i64, 0, 3, 1]),
        };
        let mut loss = |labels: &Tensor, mix: Option<&Mix>| {
            let extras = ClassAwareLoss {
                label_smoothing: 0.1,
                mix,
                logit_offsets: None,
            };
            fixed.loss(labels, &extras)
        };
        let mixed = loss(&labels, Some(&mix));
        let own = loss(&labels, None);
        let partners = loss(&labels.index_select(0, &mix.partner), None);
        assert!((own - partners).abs() > 1e-3, "{own} {partners}");
        let blend = 0.3 * own + 0.7 * partners;
        assert!((mixed - blend).abs() < 1e-5, "{mixed} vs {blend}");
    }
}
