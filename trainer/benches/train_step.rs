//! One fine-tuning step (batch 16: forward of both encoders, contrastive loss, backward, Adam) with
//! random weights and inputs. scripts/bench_train_step.py runs the same step in PyTorch eager.
//!
//! cargo bench -p trainer --bench train_step -- --config vit-b-32 --threads 2 [--device cuda --amp]
//!   [--freeze-token-embedding]
//!
//! Prints one JSON object.

use std::time::Instant;

use clap::Parser;
use tch::{nn, Device, Kind, Tensor};
use trainer::model::{Clip, ClipConfig};
use trainer::optim::{Adam, AdamConfig, LossScaler};
use trainer::train::{train_step, ClassAwareLoss, LossKind};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "vit-b-32")]
    config: String,
    #[arg(long, default_value_t = 16)]
    batch: i64,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// cpu, cuda or auto.
    #[arg(long, value_enum, default_value_t = runtime::engine::Device::Cpu)]
    device: runtime::engine::Device,
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// fp16 autocast with loss scaling (CUDA).
    #[arg(long)]
    amp: bool,
    /// Keep the text tower's token table out of the step, as `finetune --recipe scratch` does.
    #[arg(long)]
    freeze_token_embedding: bool,
    #[arg(long, hide = true)]
    bench: bool,
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    tch::set_num_threads(a.threads);
    tch::manual_seed(0);
    let device = trainer::device::resolve(a.device)?;
    let config = ClipConfig::preset(&a.config)
        .ok_or_else(|| anyhow::anyhow!("unknown config {}", a.config))?;
    let vs = nn::VarStore::new(device);
    let model = Clip::new(&vs.root(), &config);
    let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    params.sort_by(|x, y| x.0.cmp(&y.0));
    if a.freeze_token_embedding {
        params.retain_mut(|(name, t)| {
            let frozen = trainer::model::is_token_embedding(name);
            if frozen {
                let _ = t.set_requires_grad(false);
            }
            !frozen
        });
    }
    let mut adam = Adam::new(
        params,
        AdamConfig {
            lr: 1e-6,
            ..AdamConfig::default()
        },
    );
    let amp = a.amp && device.is_cuda();
    let mut scaler = LossScaler::new(amp);
    let s = config.vision_config.image_size;
    let pixels = Tensor::randn([a.batch, 3, s, s], (Kind::Float, device));
    // Prompts padded to the longest of a label set (about 12 tokens): end token at 9..12.
    let mut ids = vec![0i64; (a.batch * 16) as usize];
    for r in 0..a.batch as usize {
        let len = 9 + r % 4;
        ids[r * 16] = 49406;
        for (j, slot) in ids[r * 16 + 1..r * 16 + len].iter_mut().enumerate() {
            *slot = 320 + ((r * 31 + j * 7) % 20000) as i64;
        }
        ids[r * 16 + len] = 49407;
    }
    let ids = Tensor::from_slice(&ids)
        .view([a.batch, 16])
        .to_device(device);
    let pairs = Tensor::arange(a.batch, (Kind::Int64, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut times = Vec::new();
    let mut last_loss = 0.0;
    for step in 0..a.warmup + a.steps {
        sync();
        let t = Instant::now();
        // The same step as `trainer finetune`: one prompt per image, the contrastive loss.
        (last_loss, _) = train_step(
            &model,
            &mut adam,
            &mut scaler,
            LossKind::Contrastive,
            &pixels,
            &pairs,
            &ids,
            &ClassAwareLoss::default(),
            amp,
        );
        sync();
        if step >= a.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let params: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    println!(
        "{}",
        serde_json::json!({
            "engine": "rust-tch",
            "config": a.config,
            "parameters_m": params as f64 / 1e6,
            "device": trainer::device::name(device),
            "amp": amp,
            "threads": a.threads,
            "batch": a.batch,
            "freeze_token_embedding": a.freeze_token_embedding,
            "ms_per_step": median * 1e3,
            "images_per_s": a.batch as f64 / median,
            "peak_rss_mb": peak_rss_mb(),
            "loss": last_loss,
        })
    );
    Ok(())
}
