//! Calibration: the temperature matches SciPy's L-BFGS-B on the same logits
//! (`fixtures/calibration`, scripts/make_calibration_fixtures.py), and `runtime calibrate` writes a
//! bundle whose "unknown" rule `classify` applies.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use runtime::calibration;

#[test]
fn temperature_matches_scipy_lbfgs_within_1e_3() {
    let text = std::fs::read_to_string(common::fixtures().join("calibration/temperature.json"))
        .expect("fixture");
    let fixture: serde_json::Value = serde_json::from_str(&text).expect("json");
    let cases = fixture["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let classes = case["classes"].as_u64().unwrap() as usize;
        let truth: Vec<usize> = case["truth"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let logits: Vec<f32> = case["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let reference = case["temperature"].as_f64().unwrap();
        let ours = calibration::fit_temperature(&logits, classes, &truth).expect("fit") as f64;
        assert!(
            (ours - reference).abs() < 1e-3,
            "{classes} classes: {ours} vs SciPy {reference}"
        );
        let nll = calibration::nll(&logits, classes, &truth, ours);
        let reference_nll = case["nll_at_temperature"].as_f64().unwrap();
        assert!(
            nll <= reference_nll + 1e-6,
            "NLL {nll} vs SciPy's {reference_nll}"
        );
        assert!(
            (calibration::nll(&logits, classes, &truth, 1.0) - case["nll_at_1"].as_f64().unwrap())
                .abs()
                < 1e-4
        );
    }
}

fn png(path: &Path, f: impl Fn(u32, u32) -> u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(64, 64, |x, y| image::Luma([f(x, y)]))
        .save(path)
        .expect("png");
}

fn runtime(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(args)
        .output()
        .expect("runtime")
}

#[test]
fn calibrate_writes_a_bundle_whose_unknown_rule_classify_applies() {
    common::require_setup();
    let dir = common::tmpdir("calibrate");
    let d = dir.path();
    // Labelled images in three of the demonstration bundle's classes, and images of none of them.
    for (class, shift) in [("CXR", 0u32), ("Hand", 1), ("HeadCT", 2)] {
        for i in 0..8u32 {
            png(&d.join(format!("labelled/{class}/{i}.png")), |x, y| {
                ((x * (shift + 1) + y * (i + 2) + shift * 60) % 256) as u8
            });
        }
    }
    for i in 0..20u32 {
        png(&d.join(format!("ood/{i}.png")), |x, y| {
            ((x * (i + 3) + y * (2 * i + 1) + i * 40) % 256) as u8
        });
    }
    let out = d.join("calibrated");
    let run = runtime(&[
        "calibrate",
        "--dataset",
        "folder",
        "--data",
        d.join("labelled").to_str().unwrap(),
        "--split",
        "all",
        "--ood",
        d.join("ood").to_str().unwrap(),
        "--target-false-accept",
        "0.1",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("temperature "), "{stdout}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], 2);
    let c = &manifest["calibration"];
    assert!(c["temperature"].as_f64().unwrap() > 0.0, "{c}");
    assert_eq!(c["fitted_on"]["images"], 24);
    let threshold = c["reject_below"].as_f64().expect("a threshold") as f32;
    let reject = &c["fitted_on"]["reject"];
    assert_eq!(reject["ood_images"], 20);
    assert!(reject["false_accept"].as_f64().unwrap() <= 0.1);

    // classify with the calibrated bundle: at most 2 of the 20 OOD images (10%) are answered.
    let ood: Vec<PathBuf> = (0..20).map(|i| d.join(format!("ood/{i}.png"))).collect();
    let mut args = vec!["--model", out.to_str().unwrap()];
    args.extend(ood.iter().map(|p| p.to_str().unwrap()));
    let lines = common::classify_lines(&args, &[]);
    assert_eq!(lines.len(), 20);
    let answered = lines.iter().filter(|l| l["unknown"] == false).count();
    assert!(answered <= 2, "{answered} of 20 answered");
    for l in &lines {
        let top = l["top"][0]["probability"].as_f64().unwrap() as f32;
        assert_eq!(l["unknown"], top < threshold, "{l}");
    }
    // --no-reject: the same calibrated scores, no verdict.
    args.insert(0, "--no-reject");
    let raw = common::classify_lines(&args, &[]);
    for (a, b) in raw.iter().zip(&lines) {
        assert!(a.get("unknown").is_none());
        assert_eq!(a["top"], b["top"]);
    }
    // The source bundle is unchanged and still answers without a verdict.
    let plain = common::classify_lines(&[], &[&ood[0]]);
    assert!(plain[0].get("unknown").is_none());

    // runtime eval reports the calibration on the labelled images (in report.json too).
    let report = d.join("eval");
    let ev = runtime(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--dataset",
        "folder",
        "--data",
        d.join("labelled").to_str().unwrap(),
        "--split",
        "all",
        "--device",
        "cpu",
        "--out",
        report.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&ev.stdout).to_string();
    assert!(
        ev.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&ev.stderr)
    );
    assert!(text.contains("calibration (temperature "), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    let cal = &json["calibration"];
    // The same images the temperature was fitted on: eval's figures are calibrate's.
    for (a, b) in [
        ("ece_uncalibrated", "ece_before"),
        ("ece_calibrated", "ece_after"),
    ] {
        let (x, y) = (
            cal[a].as_f64().unwrap(),
            c["fitted_on"][b].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-6, "{a} {x} vs {b} {y}");
    }
    assert_eq!(
        cal["reliability"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>(),
        24
    );

    // runtime serve answers as classify does, and ?no_reject=true as --no-reject.
    let mut server = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--threads",
            "1",
        ])
        .args(["--model", out.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening on http://")
        .unwrap()
        .to_string();
    let body = std::fs::read(&ood[0]).unwrap();
    let post = |query: &str| -> serde_json::Value {
        for _ in 0..600 {
            let (status, _, text) = common::http_request(
                &addr,
                "POST",
                &format!("/v1/classify{query}"),
                "image/png",
                &body,
            );
            if status == 200 {
                return serde_json::from_str(&text).expect("json");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("no answer from runtime serve");
    };
    let served = post("");
    assert_eq!(served["unknown"], lines[0]["unknown"], "{served}");
    assert!(post("?no_reject=true").get("unknown").is_none());
    let _ = server.kill();
    let _ = server.wait();
}
