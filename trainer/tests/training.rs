//! The training loop on generated images (runs on every machine): it learns, checkpoints are
//! complete, a resumed run equals an uninterrupted one, and bad input is a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .output()
        .expect("run trainer")
}

use tests::tmp;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

use tests::synthetic_folder as make_folder;

fn init_tiny(dir: &Path) -> PathBuf {
    let ck = dir.join("init");
    let out = trainer(&["init", "--config", "tiny", "--seed", "3", "--out", s(&ck)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ck
}

fn finetune(
    data: &Path,
    test: &Path,
    init: &Path,
    out: &Path,
    epochs: &str,
    extra: &[&str],
) -> Output {
    let mut args = vec![
        "finetune",
        "--dataset",
        "folder",
        "--data",
        s(data),
        "--test-data",
        s(test),
        "--model",
        s(init),
        "--out",
        s(out),
        "--epochs",
        epochs,
        "--lr",
        "5e-4",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    trainer(&args)
}

fn tensors(dir: &Path) -> Vec<(String, tch::Tensor)> {
    tensors_of(&dir.join("model.safetensors"))
}

fn tensors_of(file: &Path) -> Vec<(String, tch::Tensor)> {
    let mut t = tch::Tensor::read_safetensors(file).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// The largest absolute difference between same-named tensors of two files (which must hold the
/// same names).
fn max_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (tensors_of(a), tensors_of(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn learns_checkpoints_and_resumes_exactly() {
    let dir_tmp = tmp("loop");
    let dir = dir_tmp.path().to_path_buf();
    let (data, test) = (dir.join("train"), dir.join("test"));
    make_folder(&data, 16, 1);
    make_folder(&test, 6, 2);
    let init = init_tiny(&dir);

    let full = dir.join("full");
    let out = finetune(&data, &test, &init, &full, "4", &["--augment"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(full.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics.len(), 4);
    let first = metrics[0]["train_loss"].as_f64().unwrap();
    let last = metrics[3]["train_loss"].as_f64().unwrap();
    assert!(last < first, "loss did not fall: {first} -> {last}");
    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("best.json")).unwrap()).unwrap();
    assert!(
        best["test_top1"].as_f64().unwrap() > 0.5,
        "chance is 1/3: {best}"
    );
    assert!(full.join("curves.png").exists() && full.join("metrics.csv").exists());
    // Kept: the best and the newest two; every kept checkpoint is complete; no staging leftovers.
    let kept: Vec<String> = std::fs::read_dir(full.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(kept.iter().all(|k| k.starts_with("epoch-")), "{kept:?}");
    assert!(kept.contains(&"epoch-004".to_string()) && kept.contains(&"epoch-003".to_string()));
    for k in &kept {
        for f in [
            "config.json",
            "model.safetensors",
            "optimizer.safetensors",
            "state.json",
        ] {
            assert!(full.join("checkpoints").join(k).join(f).exists(), "{k}/{f}");
        }
    }

    // Interrupted after 2 epochs, then resumed to 4: the same weights as the uninterrupted run.
    let part = dir.join("part");
    assert!(finetune(&data, &test, &init, &part, "2", &["--augment"])
        .status
        .success());
    let again = finetune(&data, &test, &init, &part, "4", &["--augment"]);
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("is an existing training run"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let out = finetune(&data, &test, &init, &part, "4", &["--resume", "--augment"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("after epoch 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        tensors(&full.join("checkpoints/epoch-004")),
        tensors(&part.join("checkpoints/epoch-004")),
    );
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let diff = (ta - tb).abs().max().double_value(&[]);
        assert_eq!(diff, 0.0, "{na} differs by {diff} after resume");
    }
    let m2: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(part.join("metrics.json")).unwrap()).unwrap();
    for (x, y) in metrics.iter().zip(&m2) {
        assert_eq!(x["train_loss"], y["train_loss"]);
        assert_eq!(x["test_top1"], y["test_top1"]);
    }

    // A run folder handed over where a checkpoint is expected means its selected checkpoint;
    // where a bundle is expected, it says to export it.
    let image = std::fs::read_dir(&test)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .next()
        .unwrap();
    let predicted = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "predict",
            "--json",
            "--device",
            "cpu",
            "--labels",
            "a,b",
            "--checkpoint",
        ])
        .arg(&part)
        .arg(&image)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&predicted.stderr);
    assert!(
        predicted.status.success() && err.contains("checkpoints/epoch-"),
        "{err}"
    );
    let err = runtime::bundle::Bundle::load(&part)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is a training run") && err.contains("trainer export"),
        "{err}"
    );
}

/// With `--weight-average`, a checkpoint's model is the average of the weights, its live weights
/// lie beside it, and a resumed run continues both exactly.
#[test]
fn the_weight_average_is_the_model_and_resumes_exactly() {
    let dir_tmp = tmp("average");
    let dir = dir_tmp.path().to_path_buf();
    let (data, test) = (dir.join("train"), dir.join("test"));
    make_folder(&data, 8, 5);
    make_folder(&test, 3, 6);
    let init = init_tiny(&dir);
    let average = ["--weight-average", "0.9", "--val", "0.25"];
    let full = dir.join("full");
    let out = finetune(&data, &test, &init, &full, "3", &average);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(live weights "), "{err}");
    let metrics: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(full.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics.iter().all(|m| m["val_top1_live"].is_f64()));
    assert!(metrics.iter().all(|m| m["val_loss"]
        .as_f64()
        .is_some_and(|l| l.is_finite() && l > 0.0)));
    assert!(err.contains("val loss "), "{err}");
    let csv = std::fs::read_to_string(full.join("metrics.csv")).unwrap();
    assert!(csv.lines().next().unwrap().ends_with(",val_loss"), "{csv}");
    let last = full.join("checkpoints/epoch-003");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(last.join("state.json")).unwrap()).unwrap();
    let steps: u64 = metrics.iter().map(|m| m["steps"].as_u64().unwrap()).sum();
    assert_eq!(
        state["average_updates"].as_u64(),
        Some(steps),
        "one update a step"
    );
    let live = last.join("live_weights.safetensors");
    assert!(
        max_difference(&last.join("model.safetensors"), &live) > 0.0,
        "the model is the average, not the live weights"
    );

    let part = dir.join("part");
    assert!(finetune(&data, &test, &init, &part, "1", &average)
        .status
        .success());
    let mut resumed = average.to_vec();
    resumed.push("--resume");
    let out = finetune(&data, &test, &init, &part, "3", &resumed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = part.join("checkpoints/epoch-003");
    for file in ["model.safetensors", "live_weights.safetensors"] {
        let diff = max_difference(&last.join(file), &again.join(file));
        assert_eq!(diff, 0.0, "{file} differs by {diff} after resume");
    }
}

/// `--crop none` is the run's preprocessing, the checkpoints' (so `trainer predict` sees what
/// training saw) and the exported bundle's; `--label-smoothing`, `--mixup`, `--logit-adjust` and
/// `--random-erase` train and are recorded.
#[test]
fn crop_none_reaches_the_checkpoints_and_the_bundle() {
    let dir_tmp = tmp("crop");
    let dir = dir_tmp.path().to_path_buf();
    let (data, test) = (dir.join("train"), dir.join("test"));
    make_folder(&data, 4, 8);
    make_folder(&test, 2, 9);
    let init = init_tiny(&dir);
    let bundle = dir.join("bundle");
    let out = finetune(
        &data,
        &test,
        &init,
        &dir.join("run"),
        "1",
        &[
            "--crop",
            "none",
            "--loss",
            "class-aware",
            "--label-smoothing",
            "0.1",
            "--mixup",
            "0.4",
            "--logit-adjust",
            "0.5",
            "--random-erase",
            "0.5",
            "--export",
            s(&bundle),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    };
    let config = json(dir.join("run/checkpoints/epoch-001/config.json"));
    assert_eq!(config["vision_config"]["crop"], "none", "{config}");
    let manifest = json(bundle.join("manifest.json"));
    assert_eq!(manifest["preprocessing"]["crop"], "none", "{manifest}");
    let training = &manifest["provenance"]["training"];
    assert_eq!(training["label_smoothing"], 0.1, "{manifest}");
    assert_eq!(training["mixup"], 0.4, "{manifest}");
    assert_eq!(training["logit_adjust"], 0.5, "{manifest}");
    assert_eq!(training["random_erase"], 0.5, "{manifest}");
    assert_eq!(training["crop"], "none", "{manifest}");
    // HF's reading of the same: a square size, no centre crop.
    let hf = json(bundle.join("preprocessor_config.json"));
    assert_eq!(hf["do_center_crop"], false, "{hf}");
    assert_eq!(hf["size"]["height"], hf["size"]["width"], "{hf}");
    // Resuming that run without the option (the init's centre crop) is refused by name.
    let out = finetune(
        &data,
        &test,
        &init,
        &dir.join("run"),
        "2",
        &["--loss", "class-aware", "--resume"],
    );
    one_error_line(
        &out,
        "was trained with --crop none; resume it with --crop none",
    );
    // Without the option the model's own (a new model's: CLIP's centre crop) is kept.
    let out = finetune(&data, &test, &init, &dir.join("centre"), "1", &[]);
    assert!(out.status.success());
    let config = json(dir.join("centre/checkpoints/epoch-001/config.json"));
    assert!(config["vision_config"].get("crop").is_none(), "{config}");
}

#[test]
fn class_aware_loss_and_frozen_encoders_train() {
    let dir_tmp = tmp("variants");
    let dir = dir_tmp.path().to_path_buf();
    let (data, test) = (dir.join("train"), dir.join("test"));
    make_folder(&data, 8, 3);
    make_folder(&test, 3, 4);
    let init = init_tiny(&dir);
    let out = finetune(
        &data,
        &test,
        &init,
        &dir.join("ca"),
        "2",
        &["--loss", "class-aware", "--freeze-text"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The text tower is unchanged, the vision tower moved.
    let before = tensors(&init);
    let after = tensors(&dir.join("ca/checkpoints/epoch-002"));
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        let same = (a - b).abs().max().double_value(&[]) == 0.0;
        if name.starts_with("text_model.") || name.starts_with("text_projection") {
            assert!(same, "{name} changed although frozen");
        }
        if name == "visual_projection.weight" {
            assert!(!same, "{name} did not change");
        }
    }
    // Only the token table frozen: it stays, the rest of the text tower trains.
    let out = finetune(
        &data,
        &test,
        &init,
        &dir.join("tok"),
        "2",
        &["--loss", "class-aware", "--freeze-token-embedding"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = tensors(&dir.join("tok/checkpoints/epoch-002"));
    let mut text_moved = false;
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        let same = (a - b).abs().max().double_value(&[]) == 0.0;
        if name == "text_model.embeddings.token_embedding.weight" {
            assert!(same, "{name} changed although frozen");
        } else if name.starts_with("text_model.") {
            text_moved |= !same;
        }
    }
    assert!(text_moved, "the rest of the text tower did not train");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tok/run.json")).unwrap()).unwrap();
    assert_eq!(run["options"]["freeze_token_embedding"], true, "{run}");

    // A sweep writes one folder per rate and a combined table.
    let out = trainer(&[
        "finetune",
        "--dataset",
        "folder",
        "--data",
        s(&data),
        "--test-data",
        s(&test),
        "--init",
        s(&init),
        "--out",
        s(&dir.join("sweep")),
        "--epochs",
        "1",
        "--lr",
        "1e-4,2e-4",
        "--batch-size",
        "8",
        "--device",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(dir.join("sweep/metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(
        dir.join("sweep/lr-1e-4/metrics.csv").exists()
            && dir.join("sweep/lr-2e-4/metrics.csv").exists()
    );
}

fn one_error_line(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = err
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect::<Vec<_>>();
    assert_eq!(last.len(), 1, "{err}");
    assert!(last[0].contains(needle), "{:?} lacks {needle:?}", last[0]);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir_tmp = tmp("bad");
    let dir = dir_tmp.path().to_path_buf();
    let (data, test) = (dir.join("train"), dir.join("test"));
    make_folder(&data, 4, 5);
    make_folder(&test, 2, 6);
    let init = init_tiny(&dir);

    // A checkpoint whose weights are of another architecture.
    let wrong = dir.join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(
        init.join("model.safetensors"),
        wrong.join("model.safetensors"),
    )
    .unwrap();
    let cfg = serde_json::to_vec(&trainer::model::ClipConfig::preset("small").unwrap()).unwrap();
    std::fs::write(wrong.join("config.json"), cfg).unwrap();
    one_error_line(
        &finetune(&data, &test, &wrong, &dir.join("r1"), "1", &[]),
        "weights do not fit the model: missing",
    );

    // Unreadable images: skipped and counted, or refused.
    std::fs::write(data.join("disc/broken.png"), b"not a png").unwrap();
    let out = finetune(
        &data,
        &test,
        &init,
        &dir.join("r2"),
        "1",
        &["--bad-images", "skip"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped 1 unreadable train image(s)"));
    one_error_line(
        &finetune(
            &data,
            &test,
            &init,
            &dir.join("r3"),
            "1",
            &["--bad-images", "fail"],
        ),
        "broken.png",
    );
    std::fs::remove_file(data.join("disc/broken.png")).unwrap();

    // An empty split.
    let empty = dir.join("empty");
    std::fs::create_dir_all(empty.join("a")).unwrap();
    one_error_line(
        &finetune(&data, &empty, &init, &dir.join("r4"), "1", &[]),
        "no label folders with images",
    );

    // A diverging run stops naming the epoch and step, and leaves no checkpoint behind.
    let r5 = dir.join("r5");
    let out = finetune(&data, &test, &init, &r5, "3", &["--lr", "1e12"]);
    one_error_line(&out, "training diverged: the loss is");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at epoch"),
        "names the epoch"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&r5)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().contains("staging")),
        "{leftovers:?}"
    );

    // The class-aware loss's options: values in range, and only where the labels are fixed.
    let cases: [(&str, &[&str], &str); 7] = [
        (
            "r7",
            &["--loss", "class-aware", "--label-smoothing", "1.5"],
            "--label-smoothing 1.5 is not a share in [0, 1)",
        ),
        (
            "r8",
            &["--label-smoothing", "0.1"],
            "--label-smoothing needs --loss class-aware",
        ),
        (
            "r9",
            &["--loss", "class-aware", "--mixup", "-0.5"],
            "--mixup -0.5 is not a Beta parameter alpha > 0",
        ),
        (
            "r10",
            &["--mixup", "0.2"],
            "--mixup needs --loss class-aware",
        ),
        (
            "r11",
            &["--loss", "class-aware", "--logit-adjust", "-1"],
            "--logit-adjust -1 is not a weight TAU >= 0",
        ),
        (
            "r12",
            &["--logit-adjust", "1"],
            "--logit-adjust needs --loss class-aware",
        ),
        (
            "r13",
            &["--random-erase", "1.5"],
            "--random-erase 1.5 is not a chance in [0, 1]",
        ),
    ];
    for (run, options, error) in cases {
        one_error_line(
            &finetune(&data, &test, &init, &dir.join(run), "1", options),
            error,
        );
    }

    // Missing init folder, unknown preset.
    one_error_line(
        &finetune(&data, &test, &dir.join("nope"), &dir.join("r6"), "1", &[]),
        "not a checkpoint folder",
    );
    one_error_line(
        &trainer(&["init", "--config", "vit-xxl", "--out", s(&dir.join("x"))]),
        "unknown configuration",
    );
    for (size, error) in [
        ("100", "not a multiple of 32"),
        ("99999968", "over 2048 pixels"),
    ] {
        let out = dir.join(format!("size-{size}"));
        one_error_line(
            &trainer(&[
                "init",
                "--config",
                "rn-tiny",
                "--image-size",
                size,
                "--out",
                s(&out),
            ]),
            error,
        );
        assert!(!out.exists(), "a refused init wrote {out:?}");
    }
}
