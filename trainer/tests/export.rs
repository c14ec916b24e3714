//! ONNX export: the graphs written from Rust run in ONNX Runtime (ort) and give the tch forward
//! pass; the files pass onnx.checker and run in Python onnxruntime.

use std::path::Path;
use std::process::Command;

use runtime::engine::{Device as OrtDevice, Encoder, Engine, EngineOptions};
use runtime::text::tokenizer::Padding;
use tch::{Device, Kind, Tensor};
use tests::tmp;
use trainer::onnx::{self, Precision};
use trainer::weights;

/// `trainer init ARGS --out DIR/init`, which must succeed; the checkpoint folder.
fn init(dir: &Path, args: &[&str]) -> std::path::PathBuf {
    let ck = dir.join("init");
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg("init")
        .args(args)
        .arg("--out")
        .arg(&ck)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ck
}

fn init_tiny(dir: &Path, seed: &str) -> std::path::PathBuf {
    init(dir, &["--config", "tiny", "--seed", seed])
}

/// `trainer export --model CK --out OUT EXTRA...`, which must succeed; the bundle it wrote.
fn export(ck: &Path, out: &Path, extra: &[&str]) -> runtime::bundle::Bundle {
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg("export")
        .args(extra)
        .arg("--model")
        .arg(ck)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bundle = runtime::bundle::Bundle::load(out).unwrap();
    // Every exported bundle carries a self-check, and reproduces it once loaded.
    let mut engine = Engine::load(bundle.clone(), cpu()).unwrap();
    let diff = engine.self_check().unwrap().expect("a self-check");
    assert!(diff <= 1e-5, "self-check difference {diff}");
    bundle
}

fn cpu() -> EngineOptions {
    EngineOptions {
        device: OrtDevice::Cpu,
        threads: 1,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn exported_graphs_match_the_tch_forward_pass() {
    let dir_tmp = tmp("export-parity");
    let dir = dir_tmp.path().to_path_buf();
    let m = weights::load(&init_tiny(&dir, "11"), Device::Cpu).unwrap();
    tch::manual_seed(5);
    let pixels = Tensor::randn([3, 3, 224, 224], (Kind::Float, Device::Cpu));
    let px: Vec<f32> = Vec::<f32>::try_from(pixels.reshape([-1])).unwrap();
    let tok = runtime::default_tokenizer().unwrap();
    let texts = [
        "a X-ray of a chest",
        "hand",
        "a X-Ray image of Lumbar Spine part, lateral view, standing",
    ];
    for precision in [Precision::Fp32, Precision::Fp16] {
        let tolerance = if precision == Precision::Fp32 {
            1e-4
        } else {
            2e-2
        };
        let mut image = Encoder::from_bytes(
            &onnx::image_encoder(&m.vs, &m.model.config, precision).unwrap(),
            "image",
            &cpu(),
            (None, None),
        )
        .unwrap();
        let (ours, dim) = image.embed_pixels(&[3, 3, 224, 224], &px).unwrap();
        let theirs = tch::no_grad(|| m.model.image_features(&pixels));
        let theirs: Vec<f32> = Vec::<f32>::try_from(theirs.reshape([-1])).unwrap();
        assert_eq!(dim, 16);
        let d_img = max_diff(&ours, &theirs);
        let mut text = Encoder::from_bytes(
            &onnx::text_encoder(&m.vs, &m.model.config, precision).unwrap(),
            "text",
            &cpu(),
            (None, None),
        )
        .unwrap();
        let mut d_txt = 0f32;
        for padding in [Padding::Longest, Padding::Context] {
            let batch = tok.encode_batch(&texts, padding).unwrap();
            let (ours, _) = text.embed_tokens(&batch).unwrap();
            let ids = Tensor::from_slice(&batch.ids).view([batch.batch as i64, batch.len as i64]);
            let theirs = tch::no_grad(|| m.model.text_features(&ids));
            let theirs: Vec<f32> = Vec::<f32>::try_from(theirs.reshape([-1])).unwrap();
            d_txt = d_txt.max(max_diff(&ours, &theirs));
        }
        eprintln!(
            "ort({precision:?}) vs tch (tiny): image max |diff| {d_img:.2e}, text {d_txt:.2e}"
        );
        assert!(
            d_img <= tolerance && d_txt <= tolerance,
            "{precision:?}: image {d_img}, text {d_txt}"
        );
    }
}

#[test]
fn bundle_passes_onnx_checker_and_python_onnxruntime() {
    let dir_tmp = tmp("export-checker");
    let dir = dir_tmp.path().to_path_buf();
    let ck = init_tiny(&dir, "12");
    for precision in ["fp32", "fp16", "int8"] {
        let out_dir = dir.join(format!("bundle-{precision}"));
        let b = export(
            &ck,
            &out_dir,
            &[
                "--labels",
                "unifesp",
                "--template",
                "a X-ray of a {}",
                "--template",
                "a image of {}",
                "--precision",
                precision,
            ],
        );
        assert_eq!(b.manifest.labels.len(), 22);
        assert_eq!(
            b.manifest.labels[3].prompts,
            vec!["a X-ray of a chest", "a image of chest"]
        );
        assert!(b.manifest.provenance.base_weights.contains("random init"));
        let python = runtime::cache_dir().join("testpy/bin/python");
        let check = Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_onnx.py"))
            .arg(out_dir.join("image_encoder.onnx"))
            .arg(out_dir.join("text_encoder.onnx"))
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup.sh", python.display()));
        assert!(
            check.status.success(),
            "{precision}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let shapes: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
        assert_eq!(shapes["image_embeds"], serde_json::json!([2, 16]));
        assert_eq!(shapes["text_embeds"], serde_json::json!([3, 16]));
    }
}

#[test]
fn export_errors_are_clear_and_leave_nothing_behind() {
    let dir_tmp = tmp("export-errors");
    let dir = dir_tmp.path().to_path_buf();
    let ck = init_tiny(&dir, "13");
    let out_dir = dir.join("bundle");
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "export",
            "--labels",
            "a,b",
            "--template",
            "no placeholder",
            "--checkpoint",
        ])
        .arg(&ck)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has no {} placeholder"),
        "{err}"
    );
    assert!(!out_dir.exists(), "a failed export left a bundle");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("staging"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Full-size ViT-B/32: export the HF weights written by `scripts/make_fixtures.py --only-full --full
/// bench-out`, run both graphs in ort and compare with tch. Also leaves the exported image encoder at
/// bench-out/vit_b32_image_encoder.rust.onnx for the speed comparison of scripts/bench.sh.
/// `cargo test --release -p trainer --test export -- --ignored --nocapture`
#[test]
#[ignore]
fn full_vit_b32_export_matches_tch() {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-out");
    let m = weights::load(&bench.join("vit-b32-hf"), Device::Cpu).unwrap();
    tch::manual_seed(5);
    let pixels = Tensor::randn([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let px: Vec<f32> = Vec::<f32>::try_from(pixels.reshape([-1])).unwrap();
    let bytes = onnx::image_encoder(&m.vs, &m.model.config, Precision::Fp32).unwrap();
    std::fs::write(bench.join("vit_b32_image_encoder.rust.onnx"), &bytes).unwrap();
    let mut image = Encoder::from_bytes(&bytes, "image", &cpu(), (None, None)).unwrap();
    let (ours, _) = image.embed_pixels(&[2, 3, 224, 224], &px).unwrap();
    let theirs: Vec<f32> =
        Vec::<f32>::try_from(tch::no_grad(|| m.model.image_features(&pixels)).reshape([-1]))
            .unwrap();
    let d_img = max_diff(&ours, &theirs);
    let tok = runtime::default_tokenizer().unwrap();
    let batch = tok
        .encode_batch(
            &["a X-Ray image of Chest part", "a image of hand"],
            Padding::Longest,
        )
        .unwrap();
    let mut text = Encoder::from_bytes(
        &onnx::text_encoder(&m.vs, &m.model.config, Precision::Fp32).unwrap(),
        "text",
        &cpu(),
        (None, None),
    )
    .unwrap();
    let (ours, _) = text.embed_tokens(&batch).unwrap();
    let ids = Tensor::from_slice(&batch.ids).view([batch.batch as i64, batch.len as i64]);
    let theirs: Vec<f32> =
        Vec::<f32>::try_from(tch::no_grad(|| m.model.text_features(&ids)).reshape([-1])).unwrap();
    let d_txt = max_diff(&ours, &theirs);
    eprintln!("ort(Fp32) vs tch (ViT-B/32): image max |diff| {d_img:.2e}, text {d_txt:.2e}");
    assert!(d_img <= 1e-4 && d_txt <= 1e-4);
}

fn npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    runtime::bundle::npy::read(path).unwrap()
}

/// OpenAI's ModifiedResNet tower (the RN50 family) against open_clip's own implementation
/// (PyPI open-clip-torch, scripts/make_resnet_fixtures.py): weights imported from open_clip's
/// safetensors layout, the tch forward pass in inference mode, and the exported ONNX graph (batch
/// norms folded into the convolutions) in ONNX Runtime, all on open_clip's embeddings.
#[test]
fn open_clip_resnet_import_and_export_match_open_clip() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/openclip-rn");
    let weights_file = fx.join("open_clip_model.safetensors");
    let (config, tensors) = weights::read_open_clip_safetensors(&weights_file).unwrap();
    assert_eq!(config.vision_config.resnet_layers, Some(vec![1, 1, 1, 1]));
    assert_eq!(
        (
            config.vision_config.image_size,
            config.vision_config.hidden_size,
            config.vision_config.num_attention_heads,
            config.projection_dim
        ),
        (64, 8, 4, 16)
    );
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let model = trainer::model::Clip::new(&vs.root(), &config);
    weights::assign(&vs, tensors, &weights_file).unwrap();

    let (pshape, px) = npy_f32(&fx.join("pixels.npy"));
    let pixels = Tensor::from_slice(&px).view([3, 3, 64, 64]);
    let (_, want_img) = npy_f32(&fx.join("image_embeds.npy"));
    let (ishape, ids) = npy_f32(&fx.join("input_ids.npy"));
    let ids: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
    let ids_t = Tensor::from_slice(&ids).view([ishape[0] as i64, ishape[1] as i64]);
    let (_, want_txt) = npy_f32(&fx.join("text_embeds.npy"));

    let ours_img: Vec<f32> =
        Vec::<f32>::try_from(tch::no_grad(|| model.image_features(&pixels)).reshape([-1])).unwrap();
    let ours_txt: Vec<f32> =
        Vec::<f32>::try_from(tch::no_grad(|| model.text_features(&ids_t)).reshape([-1])).unwrap();
    let scale = (want_img.iter().map(|v| v.abs()).fold(0f32, f32::max)).max(1.0);
    let (d_img, d_txt) = (
        max_diff(&ours_img, &want_img),
        max_diff(&ours_txt, &want_txt),
    );
    eprintln!("tch vs open_clip (RN): image max |diff| {d_img:.2e} (values up to {scale:.1}), text {d_txt:.2e}");
    assert!(d_img <= 1e-4 * scale, "image {d_img}");
    assert!(d_txt <= 1e-4, "text {d_txt}");

    let mut image = Encoder::from_bytes(
        &onnx::image_encoder(&vs, &config, Precision::Fp32).unwrap(),
        "image",
        &cpu(),
        (None, None),
    )
    .unwrap();
    let (ort_img, dim) = image.embed_pixels(&pshape, &px).unwrap();
    assert_eq!(dim, 16);
    let d_ort = max_diff(&ort_img, &want_img);
    eprintln!("ort vs open_clip (RN): image max |diff| {d_ort:.2e}");
    assert!(d_ort <= 1e-4 * scale, "onnx image {d_ort}");

    // Training mode uses batch statistics (a different output), inference mode the running ones.
    let train_out = model.image_features_t(&pixels, true);
    let train_out: Vec<f32> = Vec::<f32>::try_from(train_out.detach().reshape([-1])).unwrap();
    assert!(max_diff(&train_out, &want_img) > 1e-3);
}

/// A random-weight ResNet CLIP (at a non-default input size) trains a step, saves, reloads and
/// exports: the checkpoint keeps the batch-norm statistics the step updated, and the bundle runs
/// in ONNX Runtime as tch.
#[test]
fn resnet_checkpoint_round_trip_and_export() {
    let dir_tmp = tmp("export-resnet");
    let dir = dir_tmp.path().to_path_buf();
    let ck = init(
        &dir,
        &["--config", "rn-tiny", "--image-size", "96", "--seed", "3"],
    );
    let m = weights::load(&ck, Device::Cpu).unwrap();
    assert_eq!(m.model.config.vision_config.image_size, 96);
    let px = Tensor::randn([2, 3, 96, 96], (Kind::Float, Device::Cpu));
    let before = m.vs.variables()["visual.bn1.running_mean"].copy();
    let _ = m.model.image_features_t(&px, true);
    let after = m.vs.variables()["visual.bn1.running_mean"].copy();
    assert!((after - &before).abs().max().double_value(&[]) > 0.0);
    let saved = dir.join("saved");
    weights::save_checkpoint(&saved, &m.model.config, &m.vs, |_| Ok(())).unwrap();
    let again = weights::load(&saved, Device::Cpu).unwrap();
    let a: Vec<f32> =
        Vec::<f32>::try_from(tch::no_grad(|| m.model.image_features(&px)).reshape([-1])).unwrap();
    let b: Vec<f32> =
        Vec::<f32>::try_from(tch::no_grad(|| again.model.image_features(&px)).reshape([-1]))
            .unwrap();
    assert_eq!(a, b);
    let mut image = Encoder::from_bytes(
        &onnx::image_encoder(&again.vs, &again.model.config, Precision::Fp32).unwrap(),
        "image",
        &cpu(),
        (None, None),
    )
    .unwrap();
    let flat: Vec<f32> = Vec::<f32>::try_from(px.reshape([-1])).unwrap();
    let (ours, _) = image.embed_pixels(&[2, 3, 96, 96], &flat).unwrap();
    assert!(max_diff(&ours, &a) <= 1e-4, "{}", max_diff(&ours, &a));

    // int8: the convolutions' weights stored as int8 and dequantized before a float Conv (no
    // ConvInteger: 6 times slower in ONNX Runtime on AVX2), close to the float graph.
    let fp32 = onnx::image_encoder(&again.vs, &again.model.config, Precision::Fp32).unwrap();
    let (int8, stats) = runtime::bundle::quantize::quantize_model(
        &fp32,
        std::path::Path::new("image"),
        Default::default(),
    )
    .unwrap();
    assert!(stats.convs > 10 && int8.len() * 2 < fp32.len(), "{stats:?}");
    let graph = <runtime::onnx_proto::ModelProto as prost::Message>::decode(int8.as_slice())
        .unwrap()
        .graph
        .unwrap();
    let ops = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
    assert_eq!(ops("ConvInteger"), 0);
    assert_eq!(ops("DequantizeLinear"), stats.convs);
    let mut image = Encoder::from_bytes(&int8, "image int8", &cpu(), (None, None)).unwrap();
    let (quantized, dim) = image.embed_pixels(&[2, 3, 96, 96], &flat).unwrap();
    for (x, y) in quantized.chunks(dim).zip(ours.chunks(dim)) {
        let c = runtime::scoring::cosine(x, y);
        assert!(c >= 0.99, "int8 vs fp32 cosine {c}");
    }
}

/// Test-time flip averaging (`--test-time-flip`): the embedding of an image equals that of its
/// mirror, the plain model's does not, and the exported graph gives the tch figures (ViT and
/// ResNet towers).
#[test]
fn test_time_flip_is_mirror_invariant_and_exported() {
    for preset in ["tiny", "rn-tiny"] {
        let dir_tmp = tmp("export-flip");
        let ck = init(dir_tmp.path(), &["--config", preset, "--seed", "5"]);
        let mut m = weights::load(&ck, Device::Cpu).unwrap();
        let s = m.model.config.vision_config.image_size;
        let px = Tensor::randn([3, 3, s, s], (Kind::Float, Device::Cpu));
        let mirrored = px.flip([3]);
        let features = |model: &trainer::model::Clip, x: &Tensor| -> Vec<f32> {
            let e = tch::no_grad(|| trainer::model::normalize(&model.image_features(x)));
            Vec::<f32>::try_from(e.reshape([-1])).unwrap()
        };
        let plain = features(&m.model, &px);
        assert!(max_diff(&plain, &features(&m.model, &mirrored)) > 1e-3);

        m.model.config.vision_config.test_time_flip = true;
        let flip = features(&m.model, &px);
        let diff = max_diff(&flip, &features(&m.model, &mirrored));
        assert!(
            diff <= 1e-6,
            "{preset}: mirror changes the embedding by {diff}"
        );
        assert!(max_diff(&flip, &plain) > 1e-3);

        let mut image = Encoder::from_bytes(
            &onnx::image_encoder(&m.vs, &m.model.config, Precision::Fp32).unwrap(),
            "image",
            &cpu(),
            (None, None),
        )
        .unwrap();
        let flat: Vec<f32> = Vec::<f32>::try_from(px.reshape([-1])).unwrap();
        let (ours, _) = image
            .embed_pixels(&[3, 3, s as usize, s as usize], &flat)
            .unwrap();
        let exported: Vec<f32> = ours
            .chunks(ours.len() / 3)
            .flat_map(|row| {
                let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                row.iter().map(move |v| v / n)
            })
            .collect();
        let diff = max_diff(&exported, &flip);
        assert!(diff <= 1e-4, "{preset}: export differs from tch by {diff}");
    }
}

/// `--precision int8`: the fp32 graphs quantized (int8 weights, run-time activations); close to
/// the tch forward pass, smaller, and recorded in the manifest.
#[test]
fn int8_export_is_close_to_the_tch_forward_pass() {
    let dir_tmp = tmp("export-int8");
    let dir = dir_tmp.path().to_path_buf();
    let ck = init_tiny(&dir, "14");
    let m = weights::load(&ck, Device::Cpu).unwrap();
    let mut sizes = Vec::new();
    for precision in ["fp32", "int8"] {
        let out_dir = dir.join(precision);
        let b = export(
            &ck,
            &out_dir,
            &["--labels", "unifesp", "--precision", precision],
        );
        sizes.push(b.manifest.files["text_encoder"].bytes as f64);
        assert_eq!(b.manifest.quantization.is_some(), precision == "int8");
        if precision == "fp32" {
            continue;
        }
        let q = b.manifest.quantization.clone().unwrap();
        assert!(q.image_encoder.matmuls > 0 && q.text_encoder.unwrap().gathers == 1);
        tch::manual_seed(6);
        let pixels = Tensor::randn([4, 3, 224, 224], (Kind::Float, Device::Cpu));
        let px: Vec<f32> = Vec::<f32>::try_from(pixels.reshape([-1])).unwrap();
        let mut engine = runtime::engine::Engine::load(b, cpu()).unwrap();
        let ours = engine.embed_images(&px, 4).unwrap();
        let theirs = tch::no_grad(|| m.model.image_features(&pixels));
        let theirs: Vec<f32> = Vec::<f32>::try_from(theirs.reshape([-1])).unwrap();
        for (a, b) in ours.chunks(16).zip(theirs.chunks(16)) {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let cosine = dot / (norm(a) * norm(b));
            assert!(cosine >= 0.99, "int8 vs tch cosine {cosine}");
        }
    }
    // The token table dominates: int8 rows plus an f32 scale per row (16 wide here).
    assert!(
        sizes[1] < 0.35 * sizes[0],
        "text encoder {} -> {} bytes",
        sizes[0],
        sizes[1]
    );
}
