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
    let dir = tmp("e2e");
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
    let best = manifest["provenance"]["training"]["best_epoch"]
        .as_u64()
        .expect("best epoch recorded");
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
