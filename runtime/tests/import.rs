//! `runtime import` and `runtime assemble` on CLIP exports made by the tools users have (fixtures
//! from `scripts/make_import_fixtures.py`: one tiny random CLIP, 112 px input, logit scale 50,
//! exported by HF optimum, by `torch.onnx` with an attention mask, and in the transformers.js
//! layout with onnxruntime-quantized copies). The bundles must reproduce what HF transformers itself
//! computed for the same images and prompts.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use runtime::engine::Engine;
use runtime::text::tokenizer::Padding;

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("import/reference.json")).expect("ref"))
        .expect("json")
}

/// A copy of one layout with the tokenizer put back (the fixtures leave out the 3.6 MB copies of
/// models/tokenizer/tokenizer.json that the exporters wrote).
fn layout(name: &str) -> tempfile::TempDir {
    let dir_tmp = tmpdir(&format!("import-src-{name}"));
    let dir = dir_tmp.path().to_path_buf();
    let src = fixtures().join("import").join(name);
    for entry in walk(&src) {
        let to = dir.join(entry.strip_prefix(&src).expect("inside"));
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&entry, &to).expect("copy");
    }
    std::fs::copy(
        root().join("models/tokenizer/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .expect("tokenizer");
    dir_tmp
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").filter_map(|e| e.ok()) {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("f") as f32)
                .collect()
        })
        .collect()
}

fn unit(v: &[f32]) -> Vec<f32> {
    runtime::scoring::normalize_rows(v, v.len())
}

/// Embeddings of the reference images and prompts through a bundle, vs HF's (`CLIPModel`'s
/// outputs, which are L2-normalised; so are ours before scoring): max abs difference.
fn compare(bundle_dir: &Path) -> (f32, f32) {
    let r = reference();
    let bundle = runtime::bundle::Bundle::load(bundle_dir).expect("bundle loads");
    assert_eq!(
        bundle.manifest.preprocessing.image_size, 112,
        "preprocessing read from the export"
    );
    let mut engine = Engine::load(bundle, cpu()).expect("engine");
    let cfg = engine.bundle.manifest.preprocessing.clone();
    let mut image_diff = 0f32;
    for (name, expected) in r["images"]
        .as_array()
        .expect("images")
        .iter()
        .zip(rows(&r["image_embeds"]))
    {
        let path = fixtures().join("images").join(name.as_str().expect("name"));
        let t = runtime::pipeline::load_tensor(&path, &cfg).expect("tensor");
        let emb = engine.embed_images(&t, 1).expect("embed");
        image_diff = image_diff.max(max_abs_diff(&unit(&emb), &expected));
    }
    let tok = runtime::default_tokenizer().expect("tokenizer");
    let prompts: Vec<&str> = r["prompts"]
        .as_array()
        .expect("p")
        .iter()
        .map(|p| p.as_str().expect("s"))
        .collect();
    let batch = tok
        .encode_batch(&prompts, Padding::Longest)
        .expect("tokens");
    for (i, ids) in r["input_ids"].as_array().expect("ids").iter().enumerate() {
        let ids: Vec<i64> = ids
            .as_array()
            .expect("row")
            .iter()
            .map(|x| x.as_i64().expect("id"))
            .collect();
        assert_eq!(
            &batch.row(i)[..ids.len()],
            ids.as_slice(),
            "same token ids as HF's tokenizer"
        );
    }
    let emb = engine.embed_texts(&batch).expect("text");
    let dim = engine.bundle.manifest.embedding_dim;
    let emb = runtime::scoring::normalize_rows(&emb, dim);
    let text_diff = max_abs_diff(&emb, &rows(&r["text_embeds"]).concat());
    (image_diff, text_diff)
}

/// Imports `src` into a fresh folder; returns that folder (the bundle is its `bundle/`) and the
/// import's report.
fn import(src: &Path, extra: &[&str]) -> (tempfile::TempDir, String) {
    let tag = format!(
        "import-out-{}{}",
        src.file_name().expect("n").to_string_lossy(),
        if extra.contains(&"--quantized") {
            "-q"
        } else {
            ""
        }
    );
    let out_tmp = tmpdir(&tag);
    let out = out_tmp.path().join("bundle");
    let o = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args([
            "import", "--device", "cpu", "--labels", "unifesp", "--force", "--out",
        ])
        .arg(&out)
        .args(extra)
        .arg(src)
        .output()
        .expect("runtime import");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (out_tmp, String::from_utf8_lossy(&o.stderr).to_string())
}

#[test]
fn optimum_single_model_is_split_and_its_logit_scale_read() {
    let (out_tmp, report) = import(layout("optimum").path(), &[]);
    let out = out_tmp.path().join("bundle");
    assert!(report.contains("layout      optimum"), "{report}");
    let b = runtime::bundle::Bundle::load(&out).expect("bundle");
    assert!(
        (b.manifest.logit_scale - 50.0).abs() < 1e-3,
        "{}",
        b.manifest.logit_scale
    );
    // Each split graph holds its own tower only.
    let image = std::fs::metadata(out.join("image_encoder.onnx"))
        .expect("image")
        .len();
    let whole = std::fs::metadata(fixtures().join("import/optimum/model.onnx"))
        .expect("m")
        .len();
    assert!(image < whole / 4, "image tower {image} of {whole} bytes");
    let (img, txt) = compare(&out);
    eprintln!("optimum: image max |diff| {img:.1e}, text {txt:.1e}");
    assert!(img < 1e-4 && txt < 1e-4, "image {img}, text {txt}");
}

#[test]
fn torch_onnx_encoders_with_attention_mask() {
    let (out_tmp, report) = import(layout("torch-onnx").path(), &["--logit-scale", "50"]);
    let out = out_tmp.path().join("bundle");
    assert!(report.contains("separate encoders"), "{report}");
    let (img, txt) = compare(&out);
    eprintln!("torch.onnx: image max |diff| {img:.1e}, text {txt:.1e}");
    assert!(img < 1e-4 && txt < 1e-4, "image {img}, text {txt}");
    // The same files through `runtime assemble` (its text encoder takes attention_mask too; the
    // 112 px preprocessing from the HF file).
    let src_tmp = layout("torch-onnx");
    let src = src_tmp.path().to_path_buf();
    let dir_tmp = tmpdir("assemble-torch-onnx");
    let dir = dir_tmp.path().join("bundle");
    let o = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args([
            "assemble",
            "--device",
            "cpu",
            "--labels",
            "unifesp",
            "--logit-scale",
            "50",
            "--force",
            "--out",
        ])
        .arg(&dir)
        .arg("--image-encoder")
        .arg(src.join("vision_model.onnx"))
        .arg("--text-encoder")
        .arg(src.join("text_model.onnx"))
        .arg("--preprocessor-config")
        .arg(src.join("preprocessor_config.json"))
        .output()
        .expect("assemble");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (img, txt) = compare(&dir);
    assert!(
        img < 1e-4 && txt < 1e-4,
        "assemble: image {img}, text {txt}"
    );
}

#[test]
fn transformers_js_layout_fp32_and_quantized() {
    let src_tmp = layout("transformers-js");
    let src = src_tmp.path().to_path_buf();
    let (out_tmp, report) = import(&src, &["--logit-scale", "50"]);
    let out = out_tmp.path().join("bundle");
    assert!(report.contains("transformers.js"), "{report}");
    let (img, txt) = compare(&out);
    eprintln!("transformers.js fp32: image max |diff| {img:.1e}, text {txt:.1e}");
    assert!(img < 1e-4 && txt < 1e-4, "image {img}, text {txt}");
    // The int8 copies: close to the fp32 ones (cosine), not equal.
    let (q_tmp, _) = import(&src, &["--logit-scale", "50", "--quantized"]);
    let q = q_tmp.path().join("bundle");
    let fp = Engine::load(runtime::bundle::Bundle::load(&out).expect("fp"), cpu());
    let qb = runtime::bundle::Bundle::load(&q).expect("q");
    assert!(
        std::fs::metadata(q.join("text_encoder.onnx"))
            .expect("t")
            .len()
            < std::fs::metadata(out.join("text_encoder.onnx"))
                .expect("t")
                .len()
                / 2
    );
    let min_cos = qb
        .label_embeddings
        .chunks(qb.manifest.embedding_dim)
        .zip(
            fp.expect("engine")
                .bundle
                .label_embeddings
                .chunks(qb.manifest.embedding_dim),
        )
        .map(|(a, b)| cosine(a, b))
        .fold(1.0, f64::min);
    eprintln!("transformers.js quantized: label embeddings min cosine vs fp32 {min_cos:.4}");
    assert!(min_cos > 0.99, "{min_cos}");
}

#[test]
fn folders_without_an_export_are_a_clear_error() {
    let empty_tmp = tmpdir("import-empty");
    let empty = empty_tmp.path().to_path_buf();
    let o = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["import", "--labels", "unifesp", "--out"])
        .arg(empty.join("out"))
        .arg(&empty)
        .output()
        .expect("import");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no CLIP export found"));
}
