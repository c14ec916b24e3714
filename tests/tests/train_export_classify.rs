//! Tiny model -> a few fine-tuning steps -> export -> `classify` gives the trainer's own predictions
//! (`trainer predict`, libtorch) for the same checkpoint: same top-1, probabilities within 1e-4; the
//! fp16 export keeps every top-1.

use std::process::Command;

use tests::{bin, synthetic_folder, tmp};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[test]
fn finetune_export_classify_agree() {
    let dir_tmp = tmp("e2e");
    let dir = dir_tmp.path().to_path_buf();
    let (train, test) = (dir.join("train"), dir.join("test"));
    synthetic_folder(&train, 12, 1);
    synthetic_folder(&test, 4, 2);
    let init = dir.join("init");
    run(Command::new(bin("trainer"))
        .args(["init", "--config", "tiny", "--seed", "1", "--out"])
        .arg(&init));
    let bundle = dir.join("bundle");
    run(Command::new(bin("trainer"))
        .args([
            "finetune",
            "--dataset",
            "folder",
            "--epochs",
            "3",
            "--lr",
            "5e-4",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--template",
            "a picture of {}",
        ])
        .args([
            "--data".as_ref(),
            train.as_os_str(),
            "--test-data".as_ref(),
            test.as_os_str(),
        ])
        .args([
            "--init".as_ref(),
            init.as_os_str(),
            "--out".as_ref(),
            dir.join("run").as_os_str(),
        ])
        .args(["--export".as_ref(), bundle.as_os_str()]));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    let best = manifest["provenance"]["training"]["selected_epoch"]
        .as_u64()
        .expect("selected epoch recorded");
    assert!(
        manifest["provenance"]["metrics"]["test_top1"]
            .as_f64()
            .unwrap()
            > 0.5
    );
    let checkpoint = dir.join("run/checkpoints").join(format!("epoch-{best:03}"));
    let labels = "stripes horizontal,stripes vertical,disc";

    let theirs = lines(&run(Command::new(bin("trainer"))
        .args([
            "predict",
            "--json",
            "--device",
            "cpu",
            "--labels",
            labels,
            "--template",
            "a picture of {}",
            "-k",
            "3",
            "--checkpoint",
        ])
        .arg(&checkpoint)
        .arg(&test)));
    let ours = lines(&run(Command::new(bin("classify"))
        .args(["--device", "cpu", "--json", "-k", "3", "--model"])
        .arg(&bundle)
        .arg(&test)));
    assert_eq!(ours.len(), 12);
    assert_eq!(ours.len(), theirs.len());
    let mut worst = 0f64;
    for (o, t) in ours.iter().zip(&theirs) {
        assert_eq!(o["file"], t["file"]);
        assert_eq!(o["top"][0]["label"], t["top"][0]["label"], "{}", o["file"]);
        for k in 0..3 {
            let label = t["top"][k]["label"].as_str().unwrap();
            let mine = o["top"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["label"] == label)
                .unwrap();
            let d = (mine["probability"].as_f64().unwrap()
                - t["top"][k]["probability"].as_f64().unwrap())
            .abs();
            worst = worst.max(d);
        }
    }
    eprintln!("classify (ONNX, ort) vs trainer predict (tch): max |probability diff| {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");

    // fp16 export of the same checkpoint: every top-1 unchanged.
    let b16 = dir.join("bundle16");
    run(Command::new(bin("trainer"))
        .args([
            "export",
            "--labels",
            labels,
            "--template",
            "a picture of {}",
            "--precision",
            "fp16",
            "--checkpoint",
        ])
        .arg(&checkpoint)
        .arg("--out")
        .arg(&b16));
    let half = lines(&run(Command::new(bin("classify"))
        .args(["--device", "cpu", "--json", "-k", "3", "--model"])
        .arg(&b16)
        .arg(&test)));
    let mut worst16 = 0f64;
    for (o, h) in ours.iter().zip(&half) {
        assert_eq!(
            o["top"][0]["label"], h["top"][0]["label"],
            "fp16 changed the top-1 of {}",
            o["file"]
        );
        worst16 = worst16.max(
            (o["top"][0]["probability"].as_f64().unwrap()
                - h["top"][0]["probability"].as_f64().unwrap())
            .abs(),
        );
    }
    eprintln!("fp16 vs fp32 bundle: top-1 identical on {} images, max |top-1 probability diff| {worst16:.2e}", half.len());
}

/// `trainer finetune --recipe reference` on a generated UNIFESP repack (multi-label rows in it):
/// the reference's split, bare-name training text, StepLR, the last epoch, the test images scored
/// every epoch; the manifest records the split, and `runtime eval` (with `--split reference`, and by
/// default) scores the same 400 images with the trainer's final top-1.
#[test]
fn reference_recipe_then_eval_scores_the_same_test_images() {
    let dir_tmp = tmp("reference-recipe");
    let dir = dir_tmp.path().to_path_buf();
    let data = dir.join("unifesp");
    tests::unifesp_repack(&data, 1780);
    let init = dir.join("init");
    run(Command::new(bin("trainer"))
        .args(["init", "--config", "tiny", "--seed", "2", "--out"])
        .arg(&init));
    let (run_dir, bundle) = (dir.join("run"), dir.join("bundle"));
    run(Command::new(bin("trainer"))
        .args(["finetune", "--recipe", "reference", "--data"])
        .arg(&data)
        .arg("--init")
        .arg(&init)
        .arg("--out")
        .arg(&run_dir)
        .arg("--export")
        .arg(&bundle)
        // Quick: 3 epochs on 60 of the training images, a rate that moves a tiny model; the
        // schedule is StepLR(1, 0.5) so that it changes within them.
        .args([
            "--epochs",
            "3",
            "--max-train",
            "60",
            "--lr",
            "1e-3",
            "--lr-schedule",
            "step:1:0.5",
            "--device",
            "cpu",
        ]));
    let metrics = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
    let mut rows = csv::Reader::from_reader(metrics.as_bytes());
    let header = rows.headers().unwrap().clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = rows.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 3);
    for (i, r) in rows.iter().enumerate() {
        // Stepped at each epoch's start: epoch e runs at 1e-3 * 0.5^e.
        let lr: f64 = r[col("lr")].parse().unwrap();
        assert!(
            (lr - 1e-3 * 0.5f64.powi(i as i32 + 1)).abs() < 1e-12,
            "{metrics}"
        );
        assert!(r[col("val_top1")].is_empty(), "no validation rows");
        assert!(
            !r[col("test_top1")].is_empty(),
            "test monitored every epoch"
        );
    }
    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("best.json")).unwrap()).unwrap();
    assert_eq!(best["epoch"], 3, "the last epoch: {best}");
    assert_eq!(best["select"], "last");
    assert_eq!(best["test_images"], 400);
    let trainer_top1 = best["test_top1"].as_f64().unwrap();
    let last_monitored: f64 = rows[2][col("test_top1")].parse().unwrap();
    assert_eq!(trainer_top1, last_monitored);
    let run_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["options"]["train_template"], "{}");
    assert_eq!(run_json["options"]["loss"], "contrastive");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["provenance"]["split"], "reference");
    assert_eq!(manifest["provenance"]["dataset"], "unifesp");
    assert_eq!(manifest["templates"][0], "a X-Ray image of {} part");

    for (name, split) in [("explicit", Some("reference")), ("default", None)] {
        let report = dir.join(format!("eval-{name}"));
        let mut cmd = Command::new(bin("runtime"));
        cmd.args(["eval", "--dataset", "unifesp", "--data"])
            .arg(&data)
            .arg("--model")
            .arg(&bundle)
            .arg("--out")
            .arg(&report);
        if let Some(s) = split {
            cmd.args(["--split", s]);
        }
        run(&mut cmd);
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
        assert_eq!(r["images"], 400, "{name}");
        let top1 = r["results"][0]["report"]["top1"].as_f64().unwrap();
        assert_eq!(top1, trainer_top1, "{name}: runtime eval vs trainer");
    }
}
