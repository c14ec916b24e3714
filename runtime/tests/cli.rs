//! The binaries as a user meets them: results, and one clear line for every kind of bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use runtime::bundle::{Manifest, MANIFEST};

fn classify(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_classify"))
        .args(args)
        .output()
        .expect("run classify")
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

fn tmp(name: &str) -> tempfile::TempDir {
    common::tmpdir(&format!("cli-{name}"))
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
        1 + 6,
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
    let dir_tmp = tmp("bad-images");
    let dir = dir_tmp.path().to_path_buf();
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
    let dir_tmp = tmp("mixed");
    let dir = dir_tmp.path().to_path_buf();
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

    let missing_tmp = copy_bundle(tiny_bundle(), "missing");
    let missing = missing_tmp.path().to_path_buf();
    std::fs::remove_file(missing.join("image_encoder.onnx")).expect("rm");
    assert_one_line_error(&run(&missing), "image_encoder.onnx");

    let hash_tmp = copy_bundle(tiny_bundle(), "hash");
    let hash = hash_tmp.path().to_path_buf();
    let mut bytes = std::fs::read(hash.join("image_encoder.onnx")).expect("read");
    let n = bytes.len();
    bytes[n - 10] ^= 0xFF;
    std::fs::write(hash.join("image_encoder.onnx"), bytes).expect("write");
    assert_one_line_error(&run(&hash), "sha256");

    let count_tmp = copy_bundle(tiny_bundle(), "count");
    let count = count_tmp.path().to_path_buf();
    edit_manifest(&count, |m| {
        m.labels.pop();
    });
    assert_one_line_error(
        &run(&count),
        "label embeddings have shape [22, 16], manifest has 21 labels",
    );

    let escape_tmp = copy_bundle(tiny_bundle(), "escape");
    let escape = escape_tmp.path().to_path_buf();
    edit_manifest(&escape, |m| {
        m.files.get_mut("tokenizer").expect("tokenizer").path = "../tokenizer.json".into();
    });
    assert_one_line_error(&run(&escape), "leaves the bundle folder");

    let absolute_tmp = copy_bundle(tiny_bundle(), "absolute");
    let absolute = absolute_tmp.path().to_path_buf();
    edit_manifest(&absolute, |m| {
        m.files.get_mut("image_encoder").expect("enc").path = "/etc/passwd".into();
    });
    assert_one_line_error(&run(&absolute), "leaves the bundle folder");

    let garbage_tmp = copy_bundle(tiny_bundle(), "garbage");
    let garbage = garbage_tmp.path().to_path_buf();
    std::fs::write(garbage.join(MANIFEST), b"{ not json").expect("write");
    assert_one_line_error(&run(&garbage), "invalid JSON");

    let no_text_tmp = copy_bundle(tiny_bundle(), "no-text");
    let no_text = no_text_tmp.path().to_path_buf();
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

    let dir_tmp = tmp("preprocess");

    let dir = dir_tmp.path().to_path_buf();
    let npy_path = dir.join("x.npy");
    let img = fixtures().join("images/gray_300x217.png");
    let out = runtime_cli(&["preprocess", s(&img), "--out", s(&npy_path)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (shape, data) = runtime::bundle::npy::read(&npy_path).expect("npy");
    assert_eq!(shape, vec![1, 3, 224, 224]);
    let (_, reference) =
        runtime::bundle::npy::read(&fixtures().join("preprocess/gray_300x217.npy")).expect("ref");
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

/// Legal but absurdly shaped images (a decompression bomb once resized), a cut-off JPEG and a
/// missing path, in one run with a good file: each bad input gets its own `error:` line, the good
/// file is classified, nothing panics or runs out of memory.
#[test]
fn hostile_shapes_fail_alone_and_the_rest_goes_on() {
    let bundle = tiny_bundle();
    let dir_tmp = tmp("hostile");
    let dir = dir_tmp.path().to_path_buf();
    let good = dir.join("good.png");
    std::fs::copy(fixtures().join("images/gray_300x217.png"), &good).expect("copy");
    let tall = dir.join("tall_1x65535.png");
    image::GrayImage::from_pixel(1, 65_535, image::Luma([9]))
        .save(&tall)
        .expect("png");
    let wide = dir.join("wide_65535x1.png");
    image::GrayImage::from_pixel(65_535, 1, image::Luma([9]))
        .save(&wide)
        .expect("png");
    let tall_dcm = write_dicom(
        &dir,
        "tall_1x65535.dcm",
        image_object(65_535, 1, vec![100; 65_535], "MONOCHROME2"),
        "1.2.840.10008.1.2.1",
    );
    let jpeg = std::fs::read(fixtures().join("images/rgb_640x480.jpg")).expect("jpg");
    let cut = dir.join("cut.jpg");
    std::fs::write(&cut, &jpeg[..jpeg.len() / 3]).expect("write");
    let missing = dir.join("not-there.png");
    let bad = [&tall, &wide, &tall_dcm, &cut, &missing];
    let mut args = vec!["--model", s(bundle), "--device", "cpu", "--json", s(&good)];
    args.extend(bad.iter().map(|p| s(p)));
    let out = classify(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        errors.len(),
        bad.len() + 1,
        "one per input and a summary: {stderr}"
    );
    for p in bad {
        let name = p.file_name().expect("name").to_string_lossy();
        let line = errors
            .iter()
            .find(|l| l.contains(name.as_ref()))
            .expect("its line");
        if name.contains("65535") {
            assert!(
                line.contains("aspect ratio above the limit of 32:1"),
                "{line}"
            );
        }
        if name == "cut.jpg" {
            assert!(line.contains("truncated"), "{line}");
        }
    }
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let good_line = lines
        .iter()
        .find(|l| l["file"] == s(&good))
        .expect("good file classified");
    assert_eq!(good_line["model"], "tiny-hf");
    assert_eq!(good_line["top"].as_array().expect("top").len(), 3);
    assert_eq!(
        lines.iter().filter(|l| l.get("error").is_some()).count(),
        bad.len()
    );
    // The whole JPEG still decodes: only the cut-off one is refused.
    let whole = classify(&[
        "--model",
        s(bundle),
        "--device",
        "cpu",
        s(&fixtures().join("images/rgb_640x480.jpg")),
    ]);
    assert!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
}

/// What a new user tries on the built-in bundle: token ids, custom labels, PACS folders.
#[test]
fn first_hour_on_the_builtin_bundle() {
    // The tokenizer commands work without a bundle, and on a bundle without a tokenizer.
    let tok = runtime_cli(&["tokenize", "a X-ray of a chest"]);
    assert!(
        tok.status.success(),
        "{}",
        String::from_utf8_lossy(&tok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&tok.stdout).trim(),
        "[49406,320,343,268,3077,539,320,10563,49407]"
    );
    let default = root().join("models/default");
    let tok = runtime_cli(&["tokenize", "--model", s(&default), "a X-ray of a chest"]);
    assert!(tok.status.success());
    assert!(String::from_utf8_lossy(&tok.stderr).contains("has no tokenizer; using OpenAI"));
    // Custom labels need a text encoder: said once, with what to do.
    let img = fixtures().join("images/gray_300x217.png");
    let out = Command::new(env!("CARGO_BIN_EXE_classify"))
        .args(["--device", "cpu", "--labels", "chest,knee", s(&img)])
        .env_remove("XRAY_CLIP_MODEL")
        .output()
        .expect("classify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("has no text encoder") && stderr.contains("runtime assemble"),
        "{stderr}"
    );
    let dir_tmp = tmp("first-hour");
    let dir = dir_tmp.path().to_path_buf();
    let out = runtime_cli(&[
        "prompts",
        "--model",
        s(&default),
        "--labels",
        "irma",
        "--out",
        s(&dir.join("x")),
    ]);
    assert_one_line_error(&out, "has no text encoder");
    // --labels reads a file when one is named; a missing one is an error, not a label.
    let list = dir.join("labels.txt");
    std::fs::write(&list, "# body parts\nchest\nknee\n").expect("write");
    let out = classify(&[
        "--model",
        s(tiny_bundle()),
        "--device",
        "cpu",
        "--json",
        "--labels",
        s(&list),
        s(&img),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(line["top"].as_array().expect("top").len(), 2);
    let out = classify(&[
        "--model",
        s(tiny_bundle()),
        "--device",
        "cpu",
        "--labels",
        "labels-typo.txt",
        s(&img),
    ]);
    assert_one_line_error(&out, "no such file");
    // A PACS export: DICOM files without an extension, in nested folders.
    let pacs = dir.join("pacs/STUDY1/SERIES1");
    std::fs::create_dir_all(&pacs).expect("mkdir");
    std::fs::copy(pydicom_data().join("RG1_UNCI.dcm"), pacs.join("IM000001")).expect("copy");
    std::fs::write(pacs.join("DICOMDIR.txt"), "not an image").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_classify"))
        .args(["--device", "cpu", "--json", s(&dir.join("pacs"))])
        .env_remove("XRAY_CLIP_MODEL")
        .output()
        .expect("classify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(line["top"][0]["label"], "chest X-ray");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    assert_one_line_error(&classify(&[s(&empty)]), "recognised by content");
}

/// The output rule on `runtime prompts`, `assemble` and `preprocess`: a folder of the user's is a
/// parent and keeps its files; an existing output of the same kind is replaced only with --force.
#[test]
fn writing_commands_never_replace_what_they_did_not_create() {
    let bundle = tiny_bundle();
    let dir_tmp = tmp("output-rule");
    let dir = dir_tmp.path().to_path_buf();
    let user = dir.join("models");
    std::fs::create_dir_all(&user).expect("mkdir");
    std::fs::write(user.join("README.md"), "my notes").expect("write");
    let prompts = |out: &Path, force: bool| {
        let mut a = vec![
            "prompts",
            "--model",
            s(bundle),
            "--device",
            "cpu",
            "--template",
            "a image of {}",
            "--out",
            s(out),
        ];
        if force {
            a.push("--force");
        }
        runtime_cli(&a)
    };
    for force in [false, true] {
        let out = prompts(&user, force);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(user.join("README.md")).expect("kept"),
            "my notes"
        );
        assert!(
            user.join("tiny-hf/manifest.json").exists(),
            "bundle named after the manifest"
        );
    }
    let again = prompts(&user.join("tiny-hf"), false);
    assert_one_line_error(&again, "is an existing model bundle; pass --force");
    // A file where a folder is wanted is refused, and left alone.
    let out = prompts(&user.join("README.md"), true);
    assert_one_line_error(&out, "exists and is not a folder");
    assert_eq!(
        std::fs::read_to_string(user.join("README.md")).expect("kept"),
        "my notes"
    );
    // assemble: the same rule.
    let f = fixtures().join("tiny");
    let (image_onnx, text_onnx) = (f.join("image_encoder.onnx"), f.join("text_encoder.onnx"));
    let assemble = |force: bool| {
        let mut a = vec![
            "assemble",
            "--device",
            "cpu",
            "--labels",
            "chest,knee",
            "--name",
            "mine",
            "--out",
            s(&user),
            "--image-encoder",
            s(&image_onnx),
            "--text-encoder",
            s(&text_onnx),
        ];
        if force {
            a.push("--force");
        }
        runtime_cli(&a)
    };
    assert!(assemble(false).status.success());
    assert_one_line_error(&assemble(false), "models/mine: is an existing model bundle");
    assert!(assemble(true).status.success());
    assert_eq!(
        std::fs::read_to_string(user.join("README.md")).expect("kept"),
        "my notes"
    );
    // preprocess: an existing file only with --force; a folder gets <image>.npy inside.
    let img = fixtures().join("images/gray_300x217.png");
    let npy = user.join("README.md");
    assert_one_line_error(
        &runtime_cli(&["preprocess", s(&img), "--out", s(&npy)]),
        "pass --force",
    );
    assert_eq!(std::fs::read_to_string(&npy).expect("kept"), "my notes");
    let out = runtime_cli(&["preprocess", s(&img), "--out", s(&user)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(user.join("gray_300x217.png.npy").exists());
}
