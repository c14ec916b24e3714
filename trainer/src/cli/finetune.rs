//! `trainer finetune`: recipes, splits, the run folder, sweeps over learning rates, export.

use std::path::{Path, PathBuf};

use clap::Args;
use runtime::eval::datasets::{self, DatasetKind, Split};
use runtime::image::preprocess::{Crop, PreprocessConfig};
use runtime::text::tokenizer::ClipTokenizer;

use crate::data::{BadImages, ImageSet};
use crate::error::{Error, Result};
use crate::export::{self, ExportSpec};
use crate::onnx::Precision;
use crate::optim::{AdamConfig, LrSchedule};
use crate::report::{self, EpochMetrics, Select};
use crate::train::{self, Augment, LossKind, RunInputs, TrainOptions};
use crate::weights;

#[derive(Args)]
pub struct FinetuneArgs {
    /// unifesp (the reference experiment), irma, or folder (ROOT/<label>/images).
    #[arg(long, default_value = "unifesp")]
    pub dataset: DatasetKind,
    #[command(flatten)]
    pub data: runtime::cli::DataArgs,
    /// A separate test folder (same layout); else --split divides --data.
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// reference (the reference experiment's UNIFESP split: single-label rows [1, 1200) and
    /// [1200, 1600)), head:TRAIN:TEST (first/last images) or random:FRACTION:SEED (default:
    /// head:1200:400 for unifesp, random:0.2:SEED otherwise).
    #[arg(long)]
    pub split: Option<Split>,
    /// Model to start from: a checkpoint folder (`trainer init`) or a run folder (its selected
    /// checkpoint) [default: $XRAY_CLIP_INIT, else checkpoints/openai-vit-b-32 as the README's
    /// "Get a real model" makes it]. `--init` is the older name.
    #[arg(long = "model", visible_alias = "init", value_name = "DIR")]
    pub init: Option<PathBuf>,
    /// Run folder: checkpoints, metrics.csv/json, curves.png; with several learning rates one
    /// sub-folder per rate (default: runs/<dataset>-<UTC time>; a folder of other things: the run
    /// goes inside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace what exists at the outputs: an existing run folder starts over (unless --resume),
    /// an existing bundle at --export is replaced.
    #[arg(long)]
    pub force: bool,
    /// A set of defaults for the options below: `reference` (what the reference experiment's code
    /// did: split reference, bare class names as training text, contrastive loss, Adam lr 2e-6,
    /// StepLR(10, 0.1), 50 epochs, the last epoch reported, test scored every epoch) or `scratch`
    /// (training from random weights: class-aware loss, AdamW lr 1e-3, cosine with warm-up, 110
    /// epochs, full augmentation, token table frozen, best validation epoch). Options given
    /// explicitly win.
    #[arg(long)]
    pub recipe: Option<Recipe>,
    /// Learning rate(s); several, comma-separated, run a sweep, the best on validation kept
    /// [default: 1e-6].
    #[arg(long, value_delimiter = ',')]
    pub lr: Option<Vec<f64>>,
    /// Learning-rate schedule: constant, cosine, step (= step:10:0.1) or step:STEP_SIZE:GAMMA
    /// (torch's StepLR stepped at the start of each epoch, as the reference) [default: constant].
    #[arg(long)]
    pub lr_schedule: Option<LrSchedule>,
    /// Epochs of linear learning-rate warm-up [default: 0].
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// Epochs [default: 50].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per optimizer step [default: 16].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Weight decay [default: 0.001].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// adam (torch.optim.Adam: L2 decay in the gradient, as the reference) or adamw (decoupled
    /// decay) [default: adam].
    #[arg(long)]
    pub optimizer: Option<Optimizer>,
    /// Adam's beta1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// Adam's beta2.
    #[arg(long, default_value_t = 0.98)]
    pub beta2: f64,
    /// Adam's epsilon.
    #[arg(long, default_value_t = 1e-6)]
    pub eps: f64,
    /// Seed of the shuffles, the validation split, augmentation and random splits.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// contrastive (CLIP's, as the reference) or class-aware (each image against every label)
    /// [default: contrastive].
    #[arg(long)]
    pub loss: Option<LossKind>,
    /// Prompt template(s) that score validation and test images and make the bundle's label
    /// embeddings, `{}` = label [default: "a X-Ray image of {} part"].
    #[arg(long = "template")]
    pub templates: Vec<String>,
    /// Template of the training text, `{}` = label (`{}`: the bare class name, as the reference)
    /// [default: the first --template].
    #[arg(long)]
    pub train_template: Option<String>,
    /// Fraction of the training rows held out for validation, which chooses the epoch and the
    /// learning rate; 0: none [default: 0.1].
    #[arg(long)]
    pub val: Option<f64>,
    /// Which epoch is the model: best-val or last [default: best-val, last without --val].
    #[arg(long)]
    pub select: Option<Select>,
    /// Training-image augmentation: none, intensity (contrast, brightness; `--augment` alone) or
    /// full (also rotation, scale, shift, flip) [default: none].
    #[arg(long, num_args = 0..=1, default_missing_value = "intensity")]
    pub augment: Option<Augment>,
    /// Draw training batches with equal chances per class.
    #[arg(long)]
    pub balanced: bool,
    /// Score validation and test images (and export the model) as the mean of each image's and
    /// its left-right mirror's normalised embeddings: true or false [default: true with --recipe
    /// scratch, else false; `--test-time-flip` alone: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub test_time_flip: Option<bool>,
    /// Validate, keep and export an exponential moving average of the weights, with this decay
    /// per step (e.g. 0.998), instead of the live weights; 0: off [default: 0.998 with --recipe
    /// scratch, else 0].
    #[arg(long, value_name = "DECAY")]
    pub weight_average: Option<f64>,
    /// What the model sees of a non-square image: center (CLIP's: the shorter side resized, the
    /// centre square cut) or none (the whole image resized to the square, nothing cut); the
    /// bundle's preprocessing follows [default: none with --recipe scratch, else the model's own:
    /// center for a new one].
    #[arg(long)]
    pub crop: Option<Crop>,
    /// Class-aware loss: the share of each target spread evenly over all labels, in [0, 1)
    /// [default: 0.1 with --recipe scratch, else 0].
    #[arg(long, value_name = "EPS")]
    pub label_smoothing: Option<f64>,
    /// Class-aware loss: mixup, each batch blended with a shuffled copy of itself by a weight
    /// drawn from Beta(ALPHA, ALPHA), the loss blended alike; 0: off [default: 0].
    #[arg(long, value_name = "ALPHA", allow_negative_numbers = true)]
    pub mixup: Option<f64>,
    /// Class-aware loss: logit adjustment for rare labels, TAU * ln(share of the training rows)
    /// of each label added to the training logits only (Menon et al. 2021; 1 is the paper's
    /// choice); 0: off [default: 0].
    #[arg(long, value_name = "TAU", allow_negative_numbers = true)]
    pub logit_adjust: Option<f64>,
    /// Random erasing: the chance that a training image gets one random rectangle (2-33% of its
    /// area) set to the mean grey, after the other augmentation; 0: off [default: 0].
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub random_erase: Option<f64>,
    /// Also score the test images after every epoch (as the reference did; nothing is chosen on
    /// them).
    #[arg(long)]
    pub monitor_test: bool,
    /// Train only the text encoder.
    #[arg(long)]
    pub freeze_vision: bool,
    /// Train only the image encoder.
    #[arg(long)]
    pub freeze_text: bool,
    /// Keep the text encoder's token table (49408 x width) as it is: training text uses a few
    /// dozen of its rows, and updating all of them (gradient, Adam, weight average) is a fifth of
    /// a step of `--recipe scratch`'s small model on a CPU: true or false [default: true with
    /// --recipe scratch, else false; `--freeze-token-embedding` alone: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub freeze_token_embedding: Option<bool>,
    /// cpu, cuda or auto (CUDA when libtorch sees a GPU, else CPU).
    #[arg(long, value_enum, default_value_t = runtime::engine::Device::Auto)]
    pub device: runtime::engine::Device,
    /// CPU threads for libtorch (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Turn fp16 mixed precision off on CUDA.
    #[arg(long)]
    pub no_mixed_precision: bool,
    /// Unreadable images: skip (counted and listed) or fail.
    #[arg(long, default_value = "skip")]
    pub bad_images: BadImages,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long, requires = "out")]
    pub resume: bool,
    /// Checkpoints kept besides the best.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Use at most this many training / test images (quick runs).
    #[arg(long)]
    pub max_train: Option<usize>,
    #[arg(long)]
    pub max_test: Option<usize>,
    /// Export the best checkpoint (of the best learning rate) as a bundle: a new folder, or inside
    /// an existing folder of other things (`--export models/` writes models/<bundle name>/).
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Precision of the exported encoders.
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    /// Leave the text encoder and tokenizer out of the exported bundle (fixed labels only).
    #[arg(long)]
    pub no_text_encoder: bool,
    /// Name of the exported bundle, as `export --name` (default: the data set's name, e.g.
    /// unifesp).
    #[arg(long = "name", alias = "bundle-name")]
    pub bundle_name: Option<String>,
    /// Description written into the exported bundle's manifest.
    #[arg(long, default_value = "")]
    pub bundle_description: String,
    /// License written into the exported bundle's manifest.
    #[arg(long, default_value = "")]
    pub bundle_license: String,
    /// Notes written into the exported bundle's manifest.
    #[arg(long, default_value = "")]
    pub bundle_notes: String,
}

/// Named sets of training defaults (`--recipe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    /// The reference experiment's code, exactly (with proper mixed precision on GPUs).
    Reference,
    /// From random weights on a small data set (the UNIFESP recipe of scripts/train_unifesp.sh).
    Scratch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    Adam,
    Adamw,
}

/// The training settings after --recipe and the explicit options.
struct Settings {
    lr: Vec<f64>,
    schedule: LrSchedule,
    warmup_epochs: usize,
    epochs: usize,
    batch_size: usize,
    weight_decay: f64,
    optimizer: Optimizer,
    loss: LossKind,
    templates: Vec<String>,
    train_template: String,
    val: f64,
    select: Select,
    augment: Augment,
    balanced: bool,
    monitor_test: bool,
    test_time_flip: bool,
    freeze_token_embedding: bool,
    weight_average: f64,
    split: Option<Split>,
    /// None: the model's own.
    crop: Option<Crop>,
    label_smoothing: f64,
    mixup: f64,
    logit_adjust: f64,
    random_erase: f64,
}

fn settings(a: &FinetuneArgs) -> Settings {
    let mut d = Settings {
        lr: vec![1e-6],
        schedule: LrSchedule::Constant,
        warmup_epochs: 0,
        epochs: 50,
        batch_size: 16,
        weight_decay: 0.001,
        optimizer: Optimizer::Adam,
        loss: LossKind::Contrastive,
        templates: runtime::text::prompts::default_templates(),
        train_template: String::new(),
        val: 0.1,
        select: Select::BestVal,
        augment: Augment::None,
        balanced: false,
        monitor_test: false,
        test_time_flip: false,
        freeze_token_embedding: false,
        weight_average: 0.0,
        split: None,
        crop: None,
        label_smoothing: 0.0,
        mixup: 0.0,
        logit_adjust: 0.0,
        random_erase: 0.0,
    };
    let unifesp = a.dataset == DatasetKind::Unifesp;
    match a.recipe {
        None => {}
        Some(Recipe::Reference) => {
            d.lr = vec![2e-6];
            d.schedule = LrSchedule::Step {
                step_size: 10,
                gamma: 0.1,
            };
            d.train_template = "{}".into();
            d.val = 0.0;
            d.select = Select::Last;
            d.monitor_test = true;
            d.split = unifesp.then_some(Split::Reference);
        }
        Some(Recipe::Scratch) => {
            d.lr = vec![1e-3];
            d.schedule = LrSchedule::Cosine;
            d.warmup_epochs = 2;
            d.epochs = SCRATCH_EPOCHS;
            d.batch_size = 32;
            d.weight_decay = 0.05;
            d.optimizer = Optimizer::Adamw;
            d.loss = LossKind::ClassAware;
            d.augment = Augment::Full;
            d.test_time_flip = true;
            d.freeze_token_embedding = true;
            d.weight_average = SCRATCH_WEIGHT_AVERAGE;
            d.crop = Some(Crop::None);
            d.label_smoothing = SCRATCH_LABEL_SMOOTHING;
            d.split = unifesp.then_some(Split::Reference);
        }
    }
    let val = a.val.unwrap_or(d.val);
    Settings {
        lr: a.lr.clone().unwrap_or(d.lr),
        schedule: a.lr_schedule.unwrap_or(d.schedule),
        warmup_epochs: a.warmup_epochs.unwrap_or(d.warmup_epochs),
        epochs: a.epochs.unwrap_or(d.epochs),
        batch_size: a.batch_size.unwrap_or(d.batch_size),
        weight_decay: a.weight_decay.unwrap_or(d.weight_decay),
        optimizer: a.optimizer.unwrap_or(d.optimizer),
        loss: a.loss.unwrap_or(d.loss),
        templates: if a.templates.is_empty() {
            d.templates
        } else {
            a.templates.clone()
        },
        train_template: a.train_template.clone().unwrap_or(d.train_template),
        val,
        select: a
            .select
            .unwrap_or(if val > 0.0 { d.select } else { Select::Last }),
        augment: a.augment.unwrap_or(d.augment),
        balanced: a.balanced || d.balanced,
        monitor_test: a.monitor_test || d.monitor_test,
        test_time_flip: a.test_time_flip.unwrap_or(d.test_time_flip),
        freeze_token_embedding: a.freeze_token_embedding.unwrap_or(d.freeze_token_embedding),
        weight_average: a.weight_average.unwrap_or(d.weight_average),
        split: a.split.or(d.split),
        crop: a.crop.or(d.crop),
        label_smoothing: a.label_smoothing.unwrap_or(d.label_smoothing),
        mixup: a.mixup.unwrap_or(d.mixup),
        logit_adjust: a.logit_adjust.unwrap_or(d.logit_adjust),
        random_erase: a.random_erase.unwrap_or(d.random_erase),
    }
}

/// Epochs of `--recipe scratch`: what fits 30 minutes of a 2-core CPU with the rn-small model and
/// its token table frozen, with validation rows (`scripts/train_unifesp.sh` gives all-rows runs the
/// same number of steps).
pub const SCRATCH_EPOCHS: usize = 110;

/// Weight-average decay of `--recipe scratch`: about the last 500 steps (15 epochs of the 1199
/// UNIFESP training rows at batch 32).
pub const SCRATCH_WEIGHT_AVERAGE: f64 = 0.998;

/// Label smoothing of `--recipe scratch` (with the whole image as input: UNIFESP validation mean
/// top-1 over 90 epochs 0.850 against 0.844 without either, the last epoch 0.917 against 0.908).
pub const SCRATCH_LABEL_SMOOTHING: f64 = 0.1;

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

/// Environment variable naming the checkpoint `trainer finetune` starts from without `--model`.
pub const INIT_ENV: &str = "XRAY_CLIP_INIT";
/// Where the README's "Get a real model" recipe puts OpenAI's ViT-B/32 as a checkpoint.
pub const CONVENTIONAL_INIT: &str = "checkpoints/openai-vit-b-32";

/// The checkpoint to start from: `--model`, else `$XRAY_CLIP_INIT`, else the conventional place.
pub fn init_checkpoint(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return crate::weights::resolve_checkpoint(p);
    }
    if let Some(p) = std::env::var_os(INIT_ENV).filter(|v| !v.is_empty()) {
        return crate::weights::resolve_checkpoint(Path::new(&p));
    }
    let conventional = PathBuf::from(CONVENTIONAL_INIT);
    if conventional.is_dir() {
        return Ok(conventional);
    }
    Err(Error::NoStartingModel {
        env: INIT_ENV,
        conventional: CONVENTIONAL_INIT,
    })
}

/// `YYYYmmdd-HHMMSS` in UTC, for default run folder names.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The run folder: `--out` by the output rule (an existing run only with --resume or --force),
/// else a new `runs/<dataset>-<time>`.
fn run_folder(a: &FinetuneArgs, dataset: &str) -> Result<PathBuf> {
    let name = format!("{dataset}-{}", utc_stamp());
    let Some(out) = &a.out else {
        return Ok(PathBuf::from("runs").join(name));
    };
    let kind = runtime::fs::OutputKind::Run;
    let dir = match runtime::fs::resolve_output(out, kind, || name.clone(), true)? {
        dir if kind.is_in(&dir) && !a.resume && !a.force => {
            return Err(Error::Usage(format!(
                "{} is an existing training run; pass --resume to continue it (from its newest checkpoint) or --force to start over",
                dir.display()
            )))
        }
        dir => dir,
    };
    if a.resume && !kind.is_in(&dir) {
        eprintln!(
            "note: --resume: {} holds no run yet; starting a new one",
            dir.display()
        );
    }
    if a.force && !a.resume && kind.is_in(&dir) {
        // Start over: the old run (made by this tool, recognised by its run.json) goes as a whole.
        let aside = runtime::fs::Sidecar::Replaced.of(&dir);
        std::fs::rename(&dir, &aside).map_err(|e| Error::io(&dir, e))?;
        std::fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
    }
    Ok(dir)
}

pub fn finetune(a: &FinetuneArgs) -> Result<Vec<train::RunResult>> {
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    let device = crate::device::resolve(a.device)?;
    let st = settings(a);
    if !(0.0..0.9).contains(&st.val) {
        return Err(Error::Usage(format!(
            "--val {} is not a fraction in [0, 0.9)",
            st.val
        )));
    }
    // Options of the class-aware loss: the contrastive loss has no fixed labels to apply them to.
    let needs_class_aware = |option: &str, on: bool| {
        if on && st.loss != LossKind::ClassAware {
            return Err(Error::Usage(format!(
                "{option} needs --loss class-aware (the contrastive loss has no fixed labels)"
            )));
        }
        Ok(())
    };
    if !(0.0..1.0).contains(&st.label_smoothing) {
        return Err(Error::Usage(format!(
            "--label-smoothing {} is not a share in [0, 1)",
            st.label_smoothing
        )));
    }
    needs_class_aware("--label-smoothing", st.label_smoothing > 0.0)?;
    if !(st.mixup >= 0.0 && st.mixup.is_finite()) {
        return Err(Error::Usage(format!(
            "--mixup {} is not a Beta parameter alpha > 0 (0: off)",
            st.mixup
        )));
    }
    needs_class_aware("--mixup", st.mixup > 0.0)?;
    if !(st.logit_adjust >= 0.0 && st.logit_adjust.is_finite()) {
        return Err(Error::Usage(format!(
            "--logit-adjust {} is not a weight TAU >= 0 (0: off)",
            st.logit_adjust
        )));
    }
    needs_class_aware("--logit-adjust", st.logit_adjust > 0.0)?;
    if !(0.0..=1.0).contains(&st.random_erase) {
        return Err(Error::Usage(format!(
            "--random-erase {} is not a chance in [0, 1] (0: off)",
            st.random_erase
        )));
    }
    if !(0.0..1.0).contains(&st.weight_average) {
        return Err(Error::Usage(format!(
            "--weight-average {} is not a decay in [0, 1) (0: off)",
            st.weight_average
        )));
    }
    if st.epochs == 0 || st.batch_size == 0 || st.lr.is_empty() {
        return Err(Error::Usage(
            "--epochs, --batch-size and --lr must be positive".into(),
        ));
    }
    let init = init_checkpoint(a.init.as_deref())?;
    // The images are kept at the model's input size: read it before loading them.
    let model_config = weights::checkpoint_config(&init)?;
    let data_dir = a.data.dir(a.dataset)?;
    let ds = a.data.load(a.dataset)?;
    let short_name = match a.dataset {
        DatasetKind::Folder => runtime::bundle::folder_name(
            &data_dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "folder".into()),
        ),
        kind => kind.name().to_string(),
    };
    // Every output place is settled before the long part, so a conflict costs nothing.
    let bundle_name = a.bundle_name.clone().unwrap_or_else(|| short_name.clone());
    let export_dir = match &a.export {
        Some(dir) => Some(runtime::fs::resolve_output(
            dir,
            runtime::fs::OutputKind::Bundle,
            || runtime::bundle::folder_name(&bundle_name),
            a.force,
        )?),
        None => None,
    };
    let out = run_folder(a, &short_name)?;
    eprintln!("run folder: {}", out.display());
    let (split_spec, train_samples, test_samples) = match &a.test_data {
        Some(t) => {
            let test = datasets::load(a.dataset, t)?;
            if test.labels != ds.labels {
                return Err(Error::Dataset(format!(
                    "{}: its labels differ from {}",
                    t.display(),
                    data_dir.display()
                )));
            }
            (String::new(), ds.samples.clone(), test.samples)
        }
        None => {
            let split = st
                .split
                .unwrap_or_else(|| Split::default_for(a.dataset, a.seed));
            let (train, test) = datasets::split(&ds.samples, split)?;
            (split.to_string(), train, test)
        }
    };
    // Validation rows come out of the training rows (seeded), never out of the test rows.
    let (train_samples, val_samples) = if st.val > 0.0 {
        datasets::validation_split(&train_samples, st.val, a.seed)?
    } else {
        (train_samples, Vec::new())
    };
    if st.val > 0.0 && val_samples.is_empty() {
        return Err(Error::Dataset(format!(
            "--val {} of {} training images leaves no validation image (pass --val 0)",
            st.val,
            train_samples.len()
        )));
    }
    let train_samples = limit(train_samples, a.max_train);
    let test_samples = limit(test_samples, a.max_test);
    if train_samples.is_empty() || test_samples.is_empty() {
        return Err(Error::Dataset("the train or test split is empty".into()));
    }
    // The crop is the run's choice; train::run writes it into the model's config, so the
    // checkpoints, `trainer predict` and the bundle prepare images as the run did.
    let cfg = PreprocessConfig {
        crop: st.crop.unwrap_or(model_config.vision_config.crop),
        ..model_config.vision_config.preprocessing()
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let train_set = ImageSet::load(&train_samples, &cfg, a.bad_images, threads, "train images")?;
    let val_set = if val_samples.is_empty() {
        None
    } else {
        Some(ImageSet::load(
            &val_samples,
            &cfg,
            a.bad_images,
            threads,
            "validation images",
        )?)
    };
    let test_set = ImageSet::load(&test_samples, &cfg, a.bad_images, threads, "test images")?;
    for (what, set) in [
        ("train", Some(&train_set)),
        ("validation", val_set.as_ref()),
        ("test", Some(&test_set)),
    ] {
        let Some(set) = set else { continue };
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
        "{}: {} labels, {} train, {} validation and {} test images{}, device {}",
        ds.name,
        ds.labels.len(),
        train_set.len(),
        val_set.as_ref().map_or(0, |v| v.len()),
        test_set.len(),
        if split_spec.is_empty() {
            String::new()
        } else {
            format!(" (split {split_spec})")
        },
        crate::device::name(device)
    );
    let (tok_bytes, tok_path) = export::checkpoint_tokenizer(&init)?;
    let tokenizer = ClipTokenizer::from_bytes(&tok_bytes, &tok_path)?;
    let inputs = RunInputs {
        init: &init,
        train: &train_set,
        val: val_set.as_ref(),
        test: &test_set,
        labels: &ds.labels,
        tokenizer: &tokenizer,
        preprocess: &cfg,
        device,
    };
    let mut results = Vec::new();
    let mut curves = Vec::new();
    for &lr in &st.lr {
        let opts = TrainOptions {
            adam: AdamConfig {
                lr,
                beta1: a.beta1,
                beta2: a.beta2,
                eps: a.eps,
                weight_decay: st.weight_decay,
                decoupled_weight_decay: st.optimizer == Optimizer::Adamw,
            },
            batch_size: st.batch_size,
            epochs: st.epochs,
            seed: a.seed,
            loss: st.loss,
            freeze_vision: a.freeze_vision,
            freeze_text: a.freeze_text,
            freeze_token_embedding: st.freeze_token_embedding,
            templates: st.templates.clone(),
            train_template: st.train_template.clone(),
            mixed_precision: !a.no_mixed_precision,
            keep_checkpoints: a.keep_checkpoints,
            augment: st.augment,
            schedule: st.schedule,
            warmup_epochs: st.warmup_epochs,
            select: st.select,
            balanced: st.balanced,
            monitor_test: st.monitor_test,
            test_time_flip: st.test_time_flip,
            weight_average: (st.weight_average > 0.0).then_some(st.weight_average),
            label_smoothing: st.label_smoothing,
            mixup: (st.mixup > 0.0).then_some(st.mixup),
            logit_adjust: st.logit_adjust,
            random_erase: st.random_erase,
        };
        let dir = if st.lr.len() == 1 {
            out.clone()
        } else {
            out.join(format!("lr-{lr:e}"))
        };
        if st.lr.len() > 1 {
            eprintln!("learning rate {lr:e} -> {}", dir.display());
        }
        let r = train::run(&opts, &inputs, &dir, a.resume)?;
        eprintln!(
            "model: epoch {} ({}{}); test top-1 {:.4} on {} images ({})",
            r.test.epoch,
            match st.select {
                Select::BestVal => "best validation epoch",
                Select::Last => "last epoch",
            },
            r.val_top1()
                .map(|v| format!(", validation top-1 {v:.4}"))
                .unwrap_or_default(),
            r.test.top1,
            r.test.images,
            r.best_checkpoint.display()
        );
        curves.push((format!("lr {lr:e}"), r.state.metrics.clone()));
        results.push(r);
    }
    if st.lr.len() > 1 {
        if st.val == 0.0 {
            eprintln!("note: without --val the learning rate is chosen on the test images");
        }
        write_sweep(&out, &st.lr, &results, &curves)?;
    }
    if let Some(dir) = &export_dir {
        let (i, best) = results
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.score().total_cmp(&y.1.score()))
            .expect("one run at least");
        let training = serde_json::json!({
            "recipe": a.recipe, "lr": st.lr[i], "lr_schedule": st.schedule.to_string(),
            "warmup_epochs": st.warmup_epochs, "epochs": st.epochs, "batch_size": st.batch_size,
            "optimizer": st.optimizer, "weight_decay": st.weight_decay, "betas": [a.beta1, a.beta2],
            "eps": a.eps, "loss": st.loss, "seed": a.seed, "train_template": st.train_template,
            "augment": st.augment, "balanced": st.balanced, "test_time_flip": st.test_time_flip, "weight_average": st.weight_average, "label_smoothing": st.label_smoothing, "mixup": st.mixup, "logit_adjust": st.logit_adjust, "random_erase": st.random_erase, "freeze_token_embedding": st.freeze_token_embedding, "crop": cfg.crop, "val": st.val, "select": st.select,
            "selected_epoch": best.test.epoch, "train_images": train_set.len(),
            "val_images": val_set.as_ref().map_or(0, |v| v.len()), "test_images": test_set.len(),
            "device": crate::device::name(device),
        });
        let spec = ExportSpec {
            checkpoint: best.best_checkpoint.clone(),
            labels: ds.labels.clone(),
            templates: st.templates.clone(),
            precision: a.precision,
            name: bundle_name.clone(),
            description: if a.bundle_description.is_empty() {
                format!("fine-tuned on {}", ds.name)
            } else {
                a.bundle_description.clone()
            },
            without_text_encoder: a.no_text_encoder,
            provenance: runtime::bundle::Provenance {
                base_weights: export::base_weights(&init),
                dataset: ds.name.clone(),
                split: split_spec.clone(),
                training,
                metrics: serde_json::json!({
                    "test_top1": best.test.top1,
                    "val_top1": best.val_top1(),
                    "per_epoch": best.state.metrics,
                }),
                license: a.bundle_license.clone(),
                notes: a.bundle_notes.clone(),
            },
        };
        let b = export::export(spec, dir, a.force)?;
        eprintln!(
            "exported {} (epoch {}, test top-1 {:.4})",
            b.dir.display(),
            best.test.epoch,
            best.test.top1
        );
    }
    Ok(results)
}

fn write_sweep(
    out: &Path,
    lrs: &[f64],
    results: &[train::RunResult],
    curves: &[(String, Vec<EpochMetrics>)],
) -> Result<()> {
    let cell = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let header = [
        "lr",
        "epoch",
        "train_loss",
        "val_top1",
        "test_top1",
        "seconds",
        "val_loss",
    ]
    .map(String::from);
    let rows = lrs.iter().zip(results).flat_map(|(lr, r)| {
        r.state.metrics.iter().map(move |m| {
            [
                format!("{lr:e}"),
                m.epoch.to_string(),
                m.train_loss.to_string(),
                cell(m.val_top1),
                cell(m.test_top1),
                format!("{:.3}", m.seconds),
                cell(m.val_loss),
            ]
        })
    });
    runtime::fs::write_csv(
        &out.join("metrics.csv"),
        std::iter::once(header).chain(rows),
    )?;
    // The sweep's root is a run folder too (the output rule recognises runs by run.json).
    runtime::fs::write_atomic(
        &out.join("run.json"),
        &serde_json::to_vec_pretty(&serde_json::json!({"sweep": lrs})).expect("json"),
    )?;
    let json: Vec<_> = lrs
        .iter()
        .zip(results)
        .map(|(lr, r)| serde_json::json!({"lr": lr, "selected_epoch": r.test.epoch, "val_top1": r.val_top1(), "test_top1": r.test.top1, "epochs": r.state.metrics}))
        .collect();
    runtime::fs::write_atomic(
        &out.join("metrics.json"),
        &serde_json::to_vec_pretty(&json).expect("json"),
    )?;
    report::curves(&out.join("curves.png"), curves)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn args(extra: &[&str]) -> FinetuneArgs {
        let mut argv = vec!["trainer", "finetune"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Finetune(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn reference_recipe_is_the_reference_code() {
        let st = settings(&args(&["--recipe", "reference"]));
        assert_eq!(st.lr, vec![2e-6]);
        assert_eq!(
            st.schedule,
            LrSchedule::Step {
                step_size: 10,
                gamma: 0.1
            }
        );
        assert_eq!((st.epochs, st.batch_size), (50, 16));
        assert_eq!(st.weight_decay, 0.001);
        assert_eq!(st.optimizer, Optimizer::Adam);
        assert_eq!(st.loss, LossKind::Contrastive);
        assert_eq!(st.train_template, "{}");
        assert_eq!(st.templates, vec!["a X-Ray image of {} part".to_string()]);
        assert_eq!((st.val, st.select), (0.0, Select::Last));
        assert!(st.monitor_test);
        assert_eq!(st.split, Some(Split::Reference));
        // Explicit options win over the recipe.
        let st = settings(&args(&[
            "--recipe",
            "reference",
            "--lr",
            "1e-6,1.5e-6",
            "--epochs",
            "3",
        ]));
        assert_eq!((st.lr, st.epochs), (vec![1e-6, 1.5e-6], 3));
    }

    #[test]
    fn defaults_choose_on_validation_rows() {
        let st = settings(&args(&[]));
        assert_eq!((st.val, st.select), (0.1, Select::BestVal));
        assert!(!st.monitor_test);
        let st = settings(&args(&["--val", "0"]));
        assert_eq!(st.select, Select::Last);
        let st = settings(&args(&["--recipe", "scratch"]));
        assert_eq!(
            (st.loss, st.optimizer, st.augment, st.schedule),
            (
                LossKind::ClassAware,
                Optimizer::Adamw,
                Augment::Full,
                LrSchedule::Cosine
            )
        );
        assert_eq!(st.epochs, SCRATCH_EPOCHS);
        assert!(st.test_time_flip && !settings(&args(&[])).test_time_flip);
        let no_flip = ["--recipe", "scratch", "--test-time-flip", "false"];
        assert!(!settings(&args(&no_flip)).test_time_flip);
        assert!(settings(&args(&["--test-time-flip"])).test_time_flip);
        assert_eq!(settings(&args(&["--augment"])).augment, Augment::Intensity);
        assert_eq!(st.weight_average, SCRATCH_WEIGHT_AVERAGE);
        assert_eq!(settings(&args(&[])).weight_average, 0.0);
        assert_eq!(st.crop, Some(Crop::None));
        assert_eq!(st.label_smoothing, SCRATCH_LABEL_SMOOTHING);
        assert_eq!(
            settings(&args(&[])).crop,
            None,
            "the model's own unless asked"
        );
        assert_eq!(settings(&args(&[])).label_smoothing, 0.0);
        let whole = settings(&args(&["--crop", "none"]));
        assert_eq!(whole.crop, Some(Crop::None));
        let off = ["--recipe", "scratch", "--weight-average", "0"];
        assert_eq!(settings(&args(&off)).weight_average, 0.0);
        assert_eq!(st.mixup, 0.0, "tried on UNIFESP, not adopted");
        assert!(st.freeze_token_embedding && !settings(&args(&[])).freeze_token_embedding);
        let unfrozen = ["--recipe", "scratch", "--freeze-token-embedding", "false"];
        assert!(!settings(&args(&unfrozen)).freeze_token_embedding);
        assert!(settings(&args(&["--freeze-token-embedding"])).freeze_token_embedding);
        let mixup = ["--recipe", "scratch", "--mixup", "0.2"];
        assert_eq!(settings(&args(&mixup)).mixup, 0.2);
        assert_eq!(st.logit_adjust, 0.0);
        let adjusted = ["--recipe", "scratch", "--logit-adjust", "1"];
        assert_eq!(settings(&args(&adjusted)).logit_adjust, 1.0);
        assert_eq!(st.random_erase, 0.0);
        let erased = ["--recipe", "scratch", "--random-erase", "0.25"];
        assert_eq!(settings(&args(&erased)).random_erase, 0.25);
    }
}
