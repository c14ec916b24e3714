//! The binaries as a user meets them: results, and one clear line for every kind of bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use runtime::bundle::{Manifest, MANIFEST};

fn classify(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_classify"))
        .args(args)
        .output()
        .expect("run classify")
}

fn runtime_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(args)
        .output()
        .expect("run runtime")
}

/// Fails unless the command exited non-zero with exactly one `error:` line mentioning `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "{:?} does not mention {needle:?}",
        lines[0]
    );
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xray-clip-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG whose header claims `w` x `h` (valid signature and IHDR checksum, no real data).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    out
}

#[test]
fn classify_table_and_json_agree_with_the_library() {
    let bundle = tiny_bundle();
    let img = fixtures().join("images/gray_300x217.png");
    let out = classify(&[
        "--model",
        s(bundle),
        "--device",
        "cpu",
        "--json",
        "-k",
        "22",
        s(&img),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    let top = line["top"].as_array().expect("top");
    assert_eq!(top.len(), 22);
    let total: f64 = top
        .iter()
        .map(|t| t["probability"].as_f64().expect("p"))
        .sum();
    assert!((total - 1.0).abs() < 1e-4, "probabilities sum to {total}");
    // Same numbers through the library.
    let mut engine = runtime::engine::Engine::load(load_tiny(), cpu()).expect("engine");
    let emb = runtime::pipeline::embed_files(
        &mut engine,
        std::slice::from_ref(&img),
        &Default::default(),
    )
    .remove(0)
    .expect("emb");
    let probs = runtime::scoring::probabilities(
        &emb,
        &engine.bundle.label_embeddings,
        engine.bundle.manifest.logit_scale,
    );
    let best = runtime::scoring::top_k(&probs, 1)[0];
    assert_eq!(
        top[0]["id"].as_str(),
        Some(engine.bundle.manifest.labels[best].label.id.as_str())
    );
    assert!((top[0]["probability"].as_f64().expect("p") - probs[best] as f64).abs() < 1e-6);

    let table = classify(&[
        "--model",
        s(bundle),
        "--device",
        "cpu",
        s(&fixtures().join("images")),
    ]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(
        text.lines().count(),
        1 + 5,
        "header + one row per fixture image:\n{text}"
    );
    assert!(text.lines().next().expect("header").contains("top-3"));
}

#[test]
fn custom_labels_use_the_text_encoder() {
    let bundle = tiny_bundle();
    let img = fixtures().join("images/small_64x64.png");
    let out = classify(&[
        "--model",
        s(bundle),
        "--device",
        "cpu",
        "--json",
        "--labels",
        "chest x-ray, hand x-ray,knee",
        s(&img),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let names: Vec<&str> = line["top"]
        .as_array()
        .expect("top")
        .iter()
        .map(|t| t["label"].as_str().expect("l"))
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["chest x-ray", "hand x-ray", "knee"]);
}

#[test]
fn bad_images_get_one_clear_line() {
    let bundle = tiny_bundle();
    let dir = tmp("bad-images");
    let good = std::fs::read(fixtures().join("images/gray_300x217.png")).expect("png");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.png", vec![], "empty file"),
        (
            "truncated.png",
            good[..good.len() / 2].to_vec(),
            "cannot decode PNG",
        ),
        (
            "text.png",
            b"this is not an image\n".to_vec(),
            "not a PNG, JPEG or DICOM",
        ),
        (
            "huge.png",
            png_claiming(100_000, 100_000),
            "exceeds the limit",
        ),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        let out = classify(&["--model", s(bundle), "--device", "cpu", s(&path)]);
        assert_one_line_error(&out, needle);
        assert!(String::from_utf8_lossy(&out.stderr).contains(name));
    }
    let out = classify(&[
        "--model",
        s(bundle),
        "--device",
        "cpu",
        "/definitely/not/here.png",
    ]);
    assert_one_line_error(&out, "No such file");
}

#[test]
fn a_bad_file_in_a_folder_does_not_stop_the_others() {
    let bundle = tiny_bundle();
    let dir = tmp("mixed");
    std::fs::copy(
        fixtures().join("images/gray_300x217.png"),
        dir.join("a.png"),
    )
    .expect("copy");
    std::fs::write(dir.join("b.png"), b"nope").expect("write");
    let out = classify(&["--model", s(bundle), "--device", "cpu", "--json", s(&dir)]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 2);
    assert!(stdout.lines().next().expect("a").contains("\"top\""));
    assert!(stdout.lines().nth(1).expect("b").contains("\"error\""));
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Manifest)) {
    let path = dir.join(MANIFEST);
    let mut m: Manifest =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
    f(&mut m);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).expect("json")).expect("write");
}

#[test]
fn broken_bundles_are_refused() {
    let img = fixtures().join("images/small_64x64.png");
    let run = |dir: &Path| classify(&["--model", s(dir), "--device", "cpu", s(&img)]);

    let missing = copy_bundle(tiny_bundle(), "missing");
    std::fs::remove_file(missing.join("image_encoder.onnx")).expect("rm");
    assert_one_line_error(&run(&missing), "image_encoder.onnx");

    let hash = copy_bundle(tiny_bundle(), "hash");
    let mut bytes = std::fs::read(hash.join("image_encoder.onnx")).expect("read");
    let n = bytes.len();
    bytes[n - 10] ^= 0xFF;
    std::fs::write(hash.join("image_encoder.onnx"), bytes).expect("write");
    assert_one_line_error(&run(&hash), "sha256");

    let count = copy_bundle(tiny_bundle(), "count");
    edit_manifest(&count, |m| {
        m.labels.pop();
    });
    assert_one_line_error(
        &run(&count),
        "label embeddings have shape [22, 16], manifest has 21 labels",
    );

    let escape = copy_bundle(tiny_bundle(), "escape");
    edit_manifest(&escape, |m| {
        m.files.get_mut("tokenizer").expect("tokenizer").path = "../tokenizer.json".into();
    });
    assert_one_line_error(&run(&escape), "leaves the bundle folder");

    let absolute = copy_bundle(tiny_bundle(), "absolute");
    edit_manifest(&absolute, |m| {
        m.files.get_mut("image_encoder").expect("enc").path = "/etc/passwd".into();
    });
    assert_one_line_error(&run(&absolute), "leaves the bundle folder");

    let garbage = copy_bundle(tiny_bundle(), "garbage");
    std::fs::write(garbage.join(MANIFEST), b"{ not json").expect("write");
    assert_one_line_error(&run(&garbage), "invalid JSON");

    let no_text = copy_bundle(tiny_bundle(), "no-text");
    edit_manifest(&no_text, |m| {
        m.files.remove("text_encoder");
    });
    let out = classify(&[
        "--model",
        s(&no_text),
        "--device",
        "cpu",
        "--labels",
        "a,b",
        s(&img),
    ]);
    assert_one_line_error(&out, "has no text encoder");
}

#[test]
fn runtime_subcommands() {
    let bundle = tiny_bundle();
    let info = runtime_cli(&["info", "--model", s(bundle)]);
    assert!(info.status.success());
    assert!(String::from_utf8_lossy(&info.stdout).contains("labels      22: Abdomen, Ankle"));

    let tok = runtime_cli(&["tokenize", "--model", s(bundle), "a X-ray of a chest"]);
    assert!(tok.status.success());
    assert_eq!(
        String::from_utf8_lossy(&tok.stdout).trim(),
        "[49406,320,343,268,3077,539,320,10563,49407]"
    );

    let dir = tmp("preprocess");
    let npy_path = dir.join("x.npy");
    let img = fixtures().join("images/gray_300x217.png");
    let out = runtime_cli(&["preprocess", s(&img), "--out", s(&npy_path)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (shape, data) = runtime::npy::read(&npy_path).expect("npy");
    assert_eq!(shape, vec![1, 3, 224, 224]);
    let (_, reference) =
        runtime::npy::read(&fixtures().join("preprocess/gray_300x217.npy")).expect("ref");
    assert_eq!(data, reference);

    // Recomputing the bundle's own labels with its own template reproduces its embeddings.
    let again = dir.join("again");
    let out = runtime_cli(&[
        "prompts",
        "--model",
        s(bundle),
        "--device",
        "cpu",
        "--labels",
        "unifesp",
        "--template",
        "a X-Ray image of {} part",
        "--out",
        s(&again),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = runtime::bundle::Bundle::load(bundle).expect("a");
    let b = runtime::bundle::Bundle::load(&again).expect("b");
    assert!(max_abs_diff(&a.label_embeddings, &b.label_embeddings) < 1e-6);
    // A different template gives different embeddings, recorded in the manifest.
    let other = dir.join("other");
    let out = runtime_cli(&[
        "prompts",
        "--model",
        s(bundle),
        "--device",
        "cpu",
        "--template",
        "a image of {}",
        "--out",
        s(&other),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = runtime::bundle::Bundle::load(&other).expect("c");
    assert_eq!(c.manifest.templates, vec!["a image of {}".to_string()]);
    assert_eq!(
        c.manifest.labels[3].prompts,
        vec!["a image of chest".to_string()]
    );
    assert!(max_abs_diff(&a.label_embeddings, &c.label_embeddings) > 1e-3);

    let out = runtime_cli(&["info", "--model", "/nonexistent/bundle"]);
    assert_one_line_error(&out, "/nonexistent/bundle");
}
