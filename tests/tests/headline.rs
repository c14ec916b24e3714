//! The three headline commands exactly as a user types them (README, "Two commands" and "Using
//! it"), in a project folder of their own with the environment a user would set:
//!
//! - `trainer finetune --export models/` (data from $XRAY_CLIP_DATA, start from $XRAY_CLIP_INIT),
//!   which must leave every other file of `models/` as it was;
//! - `runtime eval --dataset irma` (the bundle in models/ with the IRMA labels);
//! - `classify xray.png` (the built-in bundle), also from a copy of the binary with the source
//!   tree out of reach.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tests::{bin, copy_tree, irma_kaggle, pattern_png, tmp, tree_digest, unifesp_repack};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A project folder as a user has it: models/ with its README, the default bundle, the tokenizer.
fn project(name: &str) -> tempfile::TempDir {
    let p = tmp(name);
    copy_tree(&repo().join("models"), &p.path().join("models"));
    p
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn failed(o: &Output, what: &str) -> String {
    assert!(!o.status.success(), "{what} should have failed");
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `line` split on spaces, run in `dir` with `env`, exactly as a shell would.
fn sh(dir: &Path, env: &[(&str, &Path)], line: &str) -> Output {
    let mut words = line.split_whitespace();
    let program = bin(words.next().expect("a command"));
    let mut c = Command::new(program);
    c.args(words).current_dir(dir).env_remove("XRAY_CLIP_MODEL");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run")
}

#[test]
fn finetune_export_into_models_keeps_everything_else() {
    let p_tmp = project("headline-finetune");
    let p = p_tmp.path().to_path_buf();
    let data = p.join("data-root");
    unifesp_repack(&data.join("unifesp"), 1610);
    let init = p.join("tiny-init");
    ok(
        &Command::new(bin("trainer"))
            .args(["init", "--config", "tiny", "--out"])
            .arg(&init)
            .output()
            .expect("init"),
        "trainer init",
    );
    let before = tree_digest(&p.join("models"));
    let env = [
        ("XRAY_CLIP_DATA", data.as_path()),
        ("XRAY_CLIP_INIT", init.as_path()),
    ];

    let o = sh(&p, &env, "trainer finetune --export models/");
    ok(&o, "trainer finetune --export models/");
    let bundle = p.join("models/unifesp");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).expect("manifest"))
            .expect("json");
    assert_eq!(manifest["name"], "unifesp");
    assert_eq!(manifest["labels"].as_array().expect("labels").len(), 22);
    assert_eq!(manifest["provenance"]["training"]["epochs"], 50);
    // Every file that was in models/ is still there, byte for byte.
    let after = tree_digest(&p.join("models"));
    for entry in &before {
        assert!(
            after.contains(entry),
            "{} changed or vanished",
            entry.0.display()
        );
    }
    // The run went to runs/unifesp-<time>.
    let runs: Vec<_> = std::fs::read_dir(p.join("runs")).expect("runs/").collect();
    assert_eq!(runs.len(), 1);

    // Again: the bundle exists, so nothing is replaced without --force (and nothing trains).
    let err = failed(
        &sh(&p, &env, "trainer finetune --export models/"),
        "second export",
    );
    assert!(
        err.contains("models/unifesp: is an existing model bundle; pass --force"),
        "{err}"
    );
    assert_eq!(tree_digest(&p.join("models")), after);
    // With --force the bundle is replaced, and still nothing else.
    let o = sh(
        &p,
        &env,
        "trainer finetune --export models/ --force --epochs 1",
    );
    ok(&o, "--force");
    let replaced = tree_digest(&p.join("models"));
    for entry in &before {
        assert!(
            replaced.contains(entry),
            "{} changed with --force",
            entry.0.display()
        );
    }
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).expect("manifest"))
            .expect("json");
    assert_eq!(m["provenance"]["training"]["epochs"], 1);

    // Without data or a checkpoint the errors say exactly what to pass.
    let err = failed(&sh(&p, &[], "trainer finetune --export models/"), "no init");
    assert!(
        err.contains("--model") && err.contains("XRAY_CLIP_INIT"),
        "{err}"
    );
    let err = failed(
        &sh(
            &p,
            &[("XRAY_CLIP_INIT", init.as_path())],
            "trainer finetune --export models/",
        ),
        "no data",
    );
    assert!(
        err.contains("--data") && err.contains("XRAY_CLIP_DATA"),
        "{err}"
    );
}

#[test]
fn eval_irma_as_written() {
    let p_tmp = project("headline-eval");
    let p = p_tmp.path().to_path_buf();
    let data = p.join("data-root");
    let rows = irma_kaggle(&data.join("irma"), 20);
    let env = [("XRAY_CLIP_DATA", data.as_path())];
    // No bundle with the IRMA labels yet: the error says how to make one.
    let err = failed(
        &sh(&p, &env, "runtime eval --dataset irma"),
        "eval without a bundle",
    );
    assert!(
        err.contains("runtime prompts") && err.contains("--labels"),
        "{err}"
    );
    // Make one the way the error says (here from the tiny fixture's encoders) ...
    let f = repo().join("fixtures/tiny");
    ok(
        &Command::new(bin("runtime"))
            .current_dir(&p)
            .args([
                "assemble", "--device", "cpu", "--labels", "irma", "--name", "irma", "--out",
                "models/",
            ])
            .arg("--image-encoder")
            .arg(f.join("image_encoder.onnx"))
            .arg("--text-encoder")
            .arg(f.join("text_encoder.onnx"))
            .output()
            .expect("assemble"),
        "runtime assemble",
    );
    assert!(p.join("models/irma/manifest.json").exists());
    assert!(p.join("models/README.md").exists());
    // ... and the headline line runs: the train codes file, not the test one, all rows read.
    let out = ok(
        &sh(&p, &env, "runtime eval --dataset irma"),
        "runtime eval --dataset irma",
    );
    assert!(out.contains(&format!("{rows} images")), "{out}");
    // The reference's own labelling keeps only rows whose third directional digit is 1-9.
    let out = ok(
        &sh(
            &p,
            &env,
            "runtime eval --dataset irma --irma-labels reference",
        ),
        "reference labels",
    );
    assert!(out.contains("4 images"), "{out}");
}

#[test]
fn classify_xray_png_as_written_and_from_an_installed_copy() {
    let p_tmp = project("headline-classify");
    let p = p_tmp.path().to_path_buf();
    pattern_png(&p.join("xray.png"), 3, 1, 300);
    let o = sh(&p, &[], "classify xray.png");
    let out = ok(&o, "classify xray.png");
    assert!(out.contains("xray.png"), "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("demonstration model that knows only 6 classes"),
        "{err}"
    );

    // A copy of the binary in a folder of its own, run with the source tree hidden (a tmpfs
    // mounted over it in a private mount namespace): the bundle and tokenizer are built in.
    let alone_tmp = tmp("installed-classify");
    let alone = alone_tmp.path().to_path_buf();
    std::fs::copy(bin("classify"), alone.join("classify")).expect("copy");
    std::fs::copy(p.join("xray.png"), alone.join("xray.png")).expect("copy");
    let workspace = std::fs::canonicalize(repo()).expect("workspace");
    let script = format!(
        "mount -t tmpfs none '{}' && test ! -e '{}/models' && ./classify --json xray.png",
        workspace.display(),
        workspace.display()
    );
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .current_dir(&alone)
        .env_remove("XRAY_CLIP_MODEL")
        .output()
        .expect("unshare");
    let out = ok(&o, "the copied classify with the workspace hidden");
    let line: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(line["model"], "xray-clip-default-mednist");
    // A mistyped XRAY_CLIP_MODEL is an error, never a silent fallback.
    let o = Command::new(alone.join("classify"))
        .arg("xray.png")
        .current_dir(&alone)
        .env("XRAY_CLIP_MODEL", alone.join("no-such-bundle"))
        .output()
        .expect("classify");
    let err = failed(&o, "mistyped XRAY_CLIP_MODEL");
    assert!(err.contains("XRAY_CLIP_MODEL="), "{err}");
}

/// `trainer init`, `export` and `finetune --out` under the same rule: a folder of other things is a
/// parent; an existing output of the same kind needs --force (a run: --resume or --force); an
/// existing folder of another kind is never touched.
#[test]
fn trainer_outputs_follow_the_rule() {
    let p_tmp = project("trainer-outputs");
    let p = p_tmp.path().to_path_buf();
    let before = tree_digest(&p.join("models"));
    let trainer = |args: &[&str]| {
        Command::new(bin("trainer"))
            .args(args)
            .current_dir(&p)
            .output()
            .expect("trainer")
    };
    ok(
        &trainer(&["init", "--config", "tiny", "--out", "models/"]),
        "init into models/",
    );
    assert!(p.join("models/tiny/model.safetensors").exists());
    let err = failed(
        &trainer(&["init", "--config", "tiny", "--out", "models/"]),
        "init again",
    );
    assert!(
        err.contains("is an existing checkpoint; pass --force"),
        "{err}"
    );
    ok(
        &trainer(&["init", "--config", "tiny", "--out", "models/", "--force"]),
        "init --force",
    );
    // The checkpoint's name is taken: export refuses to put a bundle over a checkpoint, even forced.
    let err = failed(
        &trainer(&[
            "export",
            "--checkpoint",
            "models/tiny",
            "--labels",
            "irma",
            "--out",
            "models/",
            "--force",
        ]),
        "export over a checkpoint",
    );
    assert!(
        err.contains("models/tiny: exists and is not a model bundle"),
        "{err}"
    );
    ok(
        &trainer(&[
            "export",
            "--checkpoint",
            "models/tiny",
            "--labels",
            "irma",
            "--name",
            "irma-tiny",
            "--out",
            "models/",
        ]),
        "export --name",
    );
    assert!(p.join("models/irma-tiny/manifest.json").exists());
    let after = tree_digest(&p.join("models"));
    for entry in &before {
        assert!(after.contains(entry), "{} changed", entry.0.display());
    }
    // A run folder is continued or restarted only when asked.
    let data = p.join("folder-data");
    tests::synthetic_folder(&data, 4, 1);
    let run = |extra: &[&str]| {
        let mut a = vec![
            "finetune",
            "--dataset",
            "folder",
            "--data",
            "folder-data",
            "--init",
            "models/tiny",
            "--out",
            "runs/r",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ];
        a.extend_from_slice(extra);
        if !extra.contains(&"--epochs") {
            a.extend_from_slice(&["--epochs", "1"]);
        }
        trainer(&a)
    };
    ok(&run(&[]), "first run");
    let err = failed(&run(&[]), "second run into the same folder");
    assert!(
        err.contains("is an existing training run; pass --resume") && err.contains("--force"),
        "{err}"
    );
    ok(&run(&["--resume", "--epochs", "2"]), "--resume");
    ok(&run(&["--force"]), "--force");
    let metrics = std::fs::read_to_string(p.join("runs/r/metrics.csv")).expect("metrics");
    assert_eq!(
        metrics.lines().count(),
        2,
        "started over: one epoch\n{metrics}"
    );
}
