//! The README's first command, end to end: build a bundle with the `runtime` binary, then classify a
//! real radiograph (the chest DICOM of the PyPI package pydicom-data) with the `classify` binary.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

use tests::bin;

fn pydicom_file(name: &str) -> PathBuf {
    let lib = runtime::cache_dir().join("testpy/lib");
    let py = std::fs::read_dir(&lib)
        .expect("test venv: run scripts/setup.sh")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
        })
        .expect("python3.x");
    py.join("site-packages/data_store/data").join(name)
}

#[test]
fn assemble_then_classify_a_real_chest_dicom() {
    let out_tmp = tests::tmp("e2e");
    let out = out_tmp.path().join("bundle");
    let f = root().join("fixtures");
    let status = Command::new(bin("runtime"))
        .args([
            "assemble",
            "--device",
            "cpu",
            "--labels",
            "unifesp",
            "--logit-scale",
            "100",
            "--out",
        ])
        .arg(&out)
        .arg("--image-encoder")
        .arg(f.join("tiny/image_encoder.onnx"))
        .arg("--text-encoder")
        .arg(f.join("tiny/text_encoder.onnx"))
        .arg("--tokenizer")
        .arg(root().join("models/tokenizer/tokenizer.json"))
        .status()
        .expect("runtime assemble");
    assert!(status.success());
    let dicom = pydicom_file("RG1_UNCI.dcm");
    let run = |path: &Path| {
        let o = Command::new(bin("classify"))
            .args(["--device", "cpu", "--json", "-k", "5", "--model"])
            .arg(&out)
            .arg(path)
            .output()
            .expect("classify");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json line")
    };
    let unc = run(&dicom);
    assert_eq!(unc["top"].as_array().expect("top").len(), 5);
    // The JPEG 2000 copy of the same radiograph classifies the same way.
    let j2k = run(&pydicom_file("RG1_J2KI.dcm"));
    assert_eq!(unc["top"][0]["label"], j2k["top"][0]["label"]);
    let (a, b) = (
        unc["top"][0]["probability"].as_f64().expect("p"),
        j2k["top"][0]["probability"].as_f64().expect("p"),
    );
    assert!((a - b).abs() < 0.05, "{a} vs {b}");
}

/// The README's first command: the embedded default bundle (models/default) on the real PA chest
/// radiograph of pydicom-data, without --model.
#[test]
fn default_bundle_says_chest_xray_for_the_real_chest_dicom() {
    for name in ["RG1_UNCI.dcm", "RG1_J2KI.dcm"] {
        let o = Command::new(bin("classify"))
            .args(["--device", "cpu", "--json"])
            .arg(pydicom_file(name))
            .output()
            .expect("classify");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let line: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(line["top"][0]["label"], "chest X-ray", "{name}: {line}");
    }
}

/// Every command line of the README's `sh` blocks, run as printed (bash, one block at a time, in a
/// folder laid out with the names the README uses; generated data and the tiny fixtures stand in
/// for the user's files and for OpenAI's weights). Setup lines (cargo, scripts/, downloads, export)
/// are left out: the test command runs those itself. A line that appears twice runs once, and
/// `trainer finetune --export models/` (50 epochs) runs in tests/headline.rs, exactly as printed;
/// here a bundle with its labels stands in for its result.
#[test]
fn every_readme_command_runs_as_printed() {
    let sandbox_tmp = tests::tmp("readme");
    let sandbox = sandbox_tmp.path().to_path_buf();
    let repo = root();
    tests::copy_tree(&repo.join("models"), &sandbox.join("models"));
    // The user's files, under the README's names.
    let data = sandbox.join("data-root");
    tests::unifesp_repack(&data.join("unifesp"), 1610);
    tests::irma_kaggle(&data.join("irma"), 20);
    tests::copy_tree(&data.join("unifesp"), &sandbox.join("UNIFESP"));
    tests::copy_tree(&data.join("irma"), &sandbox.join("IRMA"));
    tests::mednist_like(&sandbox.join("mednist/train"), 4);
    tests::mednist_like(&sandbox.join("mednist/test"), 2);
    for name in ["xray.png", "x.png", "scans/a.png", "scans/b/c.png"] {
        tests::pattern_png(&sandbox.join(name), 3, 1, 96);
    }
    std::fs::copy(pydicom_file("RG1_UNCI.dcm"), sandbox.join("study.dcm")).expect("copy");
    std::fs::copy(pydicom_file("RG3_UNCI.dcm"), sandbox.join("xray.dcm")).expect("copy");
    std::fs::write(sandbox.join("my-labels.txt"), "chest\nhand\nknee\n").expect("write");
    let f = repo.join("fixtures");
    tests::copy_tree(&f.join("tiny/hf"), &sandbox.join("clip-vit-base-patch32"));
    std::fs::copy(f.join("openai/openai_tiny.pt"), sandbox.join("ViT-B-32.pt")).expect("copy");
    std::fs::copy(
        f.join("openclip-rn/open_clip_model.safetensors"),
        sandbox.join("open_clip_model.safetensors"),
    )
    .expect("copy");
    std::fs::copy(
        f.join("tiny/image_encoder.onnx"),
        sandbox.join("vision.onnx"),
    )
    .expect("copy");
    std::fs::copy(f.join("tiny/text_encoder.onnx"), sandbox.join("text.onnx")).expect("copy");
    tests::copy_tree(&f.join("import/optimum"), &sandbox.join("clip-onnx"));
    std::fs::copy(
        repo.join("models/tokenizer/tokenizer.json"),
        sandbox.join("clip-onnx/tokenizer.json"),
    )
    .expect("copy");

    // What `trainer finetune --export models/` makes (run as printed by tests/headline.rs).
    let o = Command::new(bin("runtime"))
        .current_dir(&sandbox)
        .args([
            "assemble", "--device", "cpu", "--labels", "unifesp", "--name", "unifesp", "--out",
            "models/",
        ])
        .args([
            "--image-encoder",
            "vision.onnx",
            "--text-encoder",
            "text.onnx",
        ])
        .output()
        .expect("assemble");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("README");
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().expect("block")),
            (Some(b), l) => b.push(l.to_string()),
            (None, _) => {}
        }
    }
    // Join continuation lines; keep the commands of our binaries.
    let skip = [
        "cargo ",
        "scripts/",
        "huggingface-cli ",
        "python3 ",
        "export ",
        "#",
    ];
    let mut seen: std::collections::HashSet<String> =
        ["trainer finetune --export models/".to_string()].into();
    let mut scripts: Vec<Vec<String>> = Vec::new();
    for b in blocks {
        let mut lines = Vec::new();
        let mut acc = String::new();
        for l in b {
            acc.push_str(l.trim_end_matches('\\'));
            if l.ends_with('\\') {
                continue;
            }
            let cmd = std::mem::take(&mut acc);
            let trimmed = cmd.trim();
            if trimmed.is_empty() || skip.iter().any(|s| trimmed.starts_with(s)) {
                continue;
            }
            let command = trimmed.split("  #").next().unwrap_or(trimmed).trim();
            if trimmed.starts_with("R=")
                || trimmed.starts_with("T=")
                || seen.insert(command.to_string())
            {
                lines.push(trimmed.to_string());
            }
        }
        if lines
            .iter()
            .any(|l| !l.starts_with("R=") && !l.starts_with("T="))
        {
            scripts.push(lines);
        }
    }
    // "Get a real model" makes what the other blocks use: it runs first.
    scripts.sort_by_key(|s| !s.iter().any(|l| l.contains("init --from ViT-B-32.pt")));
    let bins = bin("classify").parent().expect("bin dir").to_path_buf();
    let mut ran = 0;
    for script in &scripts {
        for line in script {
            let line = line.replace("target/release/", &format!("{}/", bins.display()));
            let o = Command::new("bash")
                .args([
                    "-euo",
                    "pipefail",
                    "-c",
                    &format!("R={0}/runtime; T={0}/trainer; {line}", bins.display()),
                ])
                .current_dir(&sandbox)
                .env(
                    "PATH",
                    format!(
                        "{}:{}",
                        bins.display(),
                        std::env::var("PATH").unwrap_or_default()
                    ),
                )
                .env("XRAY_CLIP_DATA", &data)
                .env_remove("XRAY_CLIP_MODEL")
                .env_remove("XRAY_CLIP_INIT")
                .output()
                .expect("bash");
            assert!(
                o.status.success(),
                "README line failed: {line}\n{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            if !line.starts_with("R=") && !line.starts_with("T=") {
                ran += 1;
            }
        }
    }
    eprintln!("{ran} README command lines ran");
    assert!(ran >= 25, "only {ran} README commands found");
    assert!(sandbox.join("models/zero-shot/manifest.json").exists());
    assert!(sandbox.join("reports/irma-ref/report.json").exists());
}
