//! The tch CLIP against independent implementations on the same random weights: HF transformers'
//! `CLIPModel` (tiny config, HF safetensors) and OpenAI's own model code (TorchScript archive).
//! Fixtures come from scripts/make_fixtures.py.

use std::path::{Path, PathBuf};

use runtime::bundle::npy;
use runtime::text::tokenizer::{ClipTokenizer, Padding};
use tch::{nn, Device, Kind, Tensor};
use trainer::model::Clip;
use trainer::weights;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn npy_tensor(path: &Path) -> Tensor {
    let (shape, data) = npy::read(path).unwrap();
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(&data).view(shape.as_slice())
}

fn pixels(names: &[String]) -> Tensor {
    let rows: Vec<Tensor> = names
        .iter()
        .map(|n| {
            let stem = Path::new(n)
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .to_string();
            npy_tensor(&fixtures().join("preprocess").join(format!("{stem}.npy")))
        })
        .collect();
    Tensor::cat(&rows, 0)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn hf_tiny_model_matches_transformers() {
    let m = weights::load(&fixtures().join("tiny/hf"), Device::Cpu).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny/reference.json")).unwrap(),
    )
    .unwrap();
    let names: Vec<String> = reference["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let prompts: Vec<String> = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let tok =
        ClipTokenizer::from_file(&fixtures().join("../models/tokenizer/tokenizer.json")).unwrap();
    let batch = tok.encode_batch(&prompts, Padding::Context).unwrap();
    let ids = Tensor::from_slice(&batch.ids).view([batch.batch as i64, batch.len as i64]);
    let (img, txt, logits) = tch::no_grad(|| {
        let img = m.model.image_features(&pixels(&names));
        let txt = m.model.text_features(&ids);
        let logits = m.model.logits(&img, &txt);
        (img, txt, logits)
    });
    let d_img = max_diff(&img, &npy_tensor(&fixtures().join("tiny/image_embeds.npy")));
    let d_txt = max_diff(&txt, &npy_tensor(&fixtures().join("tiny/text_embeds.npy")));
    let d_log = max_diff(
        &logits,
        &npy_tensor(&fixtures().join("tiny/logits_per_image.npy")),
    );
    eprintln!(
        "tch vs HF transformers (tiny): image {d_img:.2e}, text {d_txt:.2e}, logits {d_log:.2e}"
    );
    assert!(d_img <= 1e-4 && d_txt <= 1e-4 && d_log <= 1e-4);
    // Shorter padding gives the same text embeddings (causal attention, end-token pooling).
    let short = tok.encode_batch(&prompts, Padding::Longest).unwrap();
    let ids = Tensor::from_slice(&short.ids).view([short.batch as i64, short.len as i64]);
    let txt_short = tch::no_grad(|| m.model.text_features(&ids));
    assert!(max_diff(&txt, &txt_short) <= 1e-5);
}

#[test]
fn openai_torchscript_import_matches_openai_code() {
    let (config, tensors) =
        weights::read_openai_torchscript(&fixtures().join("openai/openai_tiny.pt")).unwrap();
    assert_eq!(config.vision_config.hidden_size, 64);
    assert_eq!(config.text_config.vocab_size, 1000);
    assert_eq!(config.projection_dim, 16);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Clip::new(&vs.root(), &config);
    weights::assign(&vs, tensors, Path::new("openai_tiny.pt")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("openai/openai_reference.json")).unwrap(),
    )
    .unwrap();
    let names: Vec<String> = reference["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let ids: Vec<i64> = reference["ids"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
        .collect();
    let ids = Tensor::from_slice(&ids).view([3, 77]);
    let (img, txt) = tch::no_grad(|| {
        (
            model.image_features(&pixels(&names)),
            model.text_features(&ids),
        )
    });
    let d_img = max_diff(
        &img,
        &npy_tensor(&fixtures().join("openai/openai_image_embeds.npy")),
    );
    let d_txt = max_diff(
        &txt,
        &npy_tensor(&fixtures().join("openai/openai_text_embeds.npy")),
    );
    eprintln!("tch vs OpenAI clip (TorchScript import): image {d_img:.2e}, text {d_txt:.2e}");
    assert!(d_img <= 1e-4 && d_txt <= 1e-4);
}

#[test]
fn wrong_architecture_lists_the_tensors() {
    // The HF tiny weights into a ViT-B/32-shaped model.
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = Clip::new(
        &vs.root(),
        &trainer::model::ClipConfig::preset("vit-b-32").unwrap(),
    );
    let err = weights::assign(
        &vs,
        weights::read_safetensors(&fixtures().join("tiny/hf")).unwrap(),
        Path::new("x"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("missing 320 tensor(s): text_model.encoder.layers.10"),
        "{err}"
    );
    assert!(err.contains("mis-shaped: text_model.embeddings.position_embedding.weight is [77, 16], model wants [77, 512]"), "{err}");
    assert!(
        err.len() < 2000,
        "the message stays readable: {} chars",
        err.len()
    );
    // Extra tensors are named too.
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = Clip::new(
        &vs.root(),
        &trainer::model::ClipConfig::preset("tiny").unwrap(),
    );
    let mut t = weights::read_safetensors(&fixtures().join("tiny/hf")).unwrap();
    t.push((
        "something.else".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    let err = weights::assign(&vs, t, Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected 1 tensor(s): something.else"),
        "{err}"
    );
}

#[test]
fn adam_matches_torch_optim_adam() {
    let p0 = npy_tensor(&fixtures().join("adam/adam_initial.npy"));
    let grads = npy_tensor(&fixtures().join("adam/adam_grads.npy"));
    let after = npy_tensor(&fixtures().join("adam/adam_after.npy"));
    let p = p0.copy().set_requires_grad(true);
    let config = trainer::optim::AdamConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.001,
        decoupled_weight_decay: false,
    };
    let mut adam = trainer::optim::Adam::new(vec![("p".into(), p.shallow_clone())], config);
    for step in 0..5 {
        adam.zero_grad();
        (&p * grads.get(step)).sum(Kind::Float).backward();
        assert!(adam.step(1.0, true));
        let d = max_diff(&p.detach(), &after.get(step));
        assert!(d < 1e-6, "step {step}: {d}");
    }
}

/// Full-size ViT-B/32 (151 M parameters) against HF transformers. Needs the weights and references
/// that `scripts/make_fixtures.py --only-full --full bench-out` writes (600 MB, not committed):
/// `cargo test --release -p trainer --test parity -- --ignored`.
#[test]
#[ignore]
fn hf_vit_b32_matches_transformers() {
    let dir = std::env::var_os("XRAY_CLIP_VIT_B32_HF")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixtures().join("../bench-out/vit-b32-hf"));
    let m = weights::load(&dir, Device::Cpu).unwrap();
    assert_eq!(m.model.config.vision_config.hidden_size, 768);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let names: Vec<String> = reference["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let prompts: Vec<String> = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let tok =
        ClipTokenizer::from_file(&fixtures().join("../models/tokenizer/tokenizer.json")).unwrap();
    let batch = tok.encode_batch(&prompts, Padding::Context).unwrap();
    let ids = Tensor::from_slice(&batch.ids).view([batch.batch as i64, batch.len as i64]);
    let (img, txt, logits) = tch::no_grad(|| {
        let img = m.model.image_features(&pixels(&names));
        let txt = m.model.text_features(&ids);
        let logits = m.model.logits(&img, &txt);
        (
            trainer::model::normalize(&img),
            trainer::model::normalize(&txt),
            logits,
        )
    });
    let d_img = max_diff(&img, &npy_tensor(&dir.join("image_embeds.npy")));
    let d_txt = max_diff(&txt, &npy_tensor(&dir.join("text_embeds.npy")));
    let d_log = max_diff(&logits, &npy_tensor(&dir.join("logits_per_image.npy")));
    eprintln!("tch vs HF transformers (ViT-B/32): image {d_img:.2e}, text {d_txt:.2e}, logits {d_log:.2e}");
    assert!(d_img <= 1e-4 && d_txt <= 1e-4 && d_log <= 1e-3);
}

#[test]
fn step_schedule_matches_torch_steplr_stepped_at_each_epoch_start() {
    use trainer::optim::LrSchedule;
    let f: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("schedules/steplr.json")).unwrap(),
    )
    .unwrap();
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let base = case["base"].as_f64().unwrap();
        let spec = format!(
            "step:{}:{}",
            case["step_size"].as_u64().unwrap(),
            case["gamma"].as_f64().unwrap()
        );
        let schedule: LrSchedule = spec.parse().unwrap();
        let torch: Vec<f64> = case["lr_per_epoch"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let (steps_per_epoch, epochs) = (7, torch.len());
        for (e, want) in torch.iter().enumerate() {
            // Every optimizer step of the epoch runs at the epoch's rate.
            for s in 0..steps_per_epoch {
                let got = schedule.lr(base, e * steps_per_epoch + s, steps_per_epoch, epochs, 0);
                assert!(
                    ((got - want) / want).abs() < 1e-9,
                    "{spec}: epoch {} step {s}: {got} vs torch {want}",
                    e + 1
                );
            }
        }
    }
    // The reference: full rate for epochs 1-9, x0.1 from epoch 10.
    let reference: LrSchedule = "step:10:0.1".parse().unwrap();
    assert_eq!(reference.lr(2e-6, 8, 1, 50, 0), 2e-6);
    assert!((reference.lr(2e-6, 9, 1, 50, 0) - 2e-7).abs() < 1e-18);
}

#[test]
fn cosine_schedule_warms_up_then_decays_to_zero() {
    use trainer::optim::LrSchedule;
    let c: LrSchedule = "cosine".parse().unwrap();
    let (spe, epochs, warm) = (10, 20, 2);
    // Linear warm-up over 20 steps, reaching the base rate at its last step.
    assert!((c.lr(1.0, 0, spe, epochs, warm) - 0.05).abs() < 1e-12);
    assert!((c.lr(1.0, 19, spe, epochs, warm) - 1.0).abs() < 1e-12);
    // Then half-cosine over the remaining 180 steps.
    assert!((c.lr(1.0, 20 + 90, spe, epochs, warm) - 0.5).abs() < 1e-12);
    assert!(c.lr(1.0, 199, spe, epochs, warm) < 1e-3);
    let mut last = f64::INFINITY;
    for s in 20..200 {
        let lr = c.lr(1.0, s, spe, epochs, warm);
        assert!(lr <= last);
        last = lr;
    }
    for bad in ["step:0:0.1", "step:10:-1", "linear", "step:10"] {
        assert!(bad.parse::<LrSchedule>().is_err(), "{bad}");
    }
}
