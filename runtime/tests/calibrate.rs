//! Calibration: the temperature matches SciPy's L-BFGS-B on the same logits
//! (`fixtures/calibration`, scripts/make_calibration_fixtures.py), and `runtime calibrate` writes a
//! bundle whose "unknown" rule (class centroids, or the calibrated probability) `classify`,
//! `runtime eval`, `runtime serve` apply; older formats still load.

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

fn runtime<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(args)
        .output()
        .expect("runtime")
}

/// The arguments of `runtime COMMAND` on every image of `dir/labelled` (folder layout) with
/// `dir/ood` as the out-of-distribution images, on the CPU, then `extra`.
fn on_images(command: &str, dir: &Path, extra: &[&str]) -> Vec<String> {
    let path = |p: &str| dir.join(p).to_str().unwrap().to_string();
    [command, "--dataset", "folder", "--data"]
        .iter()
        .map(|a| a.to_string())
        .chain([
            path("labelled"),
            "--split".into(),
            "all".into(),
            "--ood".into(),
        ])
        .chain([path("ood"), "--device".into(), "cpu".into()])
        .chain(extra.iter().map(|a| a.to_string()))
        .collect()
}

/// Runs `runtime ARGS`, asserts success, returns stdout.
fn runtime_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let run = runtime(args);
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "runtime {args:?}: {stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

/// Labelled images (`per` of each of `classes`, generated patterns) under `dir/labelled`, and 20
/// images of none of them under `dir/ood`; returns the OOD files.
fn images(dir: &Path, classes: &[&str], per: u32) -> Vec<PathBuf> {
    for (shift, class) in classes.iter().enumerate() {
        let shift = shift as u32;
        for i in 0..per {
            png(&dir.join(format!("labelled/{class}/{i}.png")), |x, y| {
                ((x * (shift + 1) + y * (i + 2) + shift * 60) % 256) as u8
            });
        }
    }
    (0..20u32)
        .map(|i| {
            let p = dir.join(format!("ood/{i}.png"));
            png(&p, |x, y| {
                ((x * (i + 3) + y * (2 * i + 1) + i * 40) % 256) as u8
            });
            p
        })
        .collect()
}

fn manifest(bundle: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap()).unwrap()
}

const DEMO_CLASSES: [&str; 6] = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"];

#[test]
fn the_centroid_rule_is_fitted_written_and_applied_by_classify_eval_and_serve() {
    common::require_setup();
    let dir = common::tmpdir("calibrate");
    let d = dir.path();
    let ood = images(d, &DEMO_CLASSES, 6);
    let out = d.join("calibrated");
    let (labelled, out_s) = (d.join("labelled"), out.to_str().unwrap().to_string());
    let stdout = runtime_ok(&on_images(
        "calibrate",
        d,
        &["--target-false-accept", "0.1", "--out", &out_s],
    ));
    assert!(
        stdout.contains("cosine to the nearest class centroid"),
        "{stdout}"
    );
    let m = manifest(&out);
    assert_eq!(m["format_version"], 3, "a centroid rule needs format 3");
    assert!(m["files"]["class_centroids"]["sha256"].is_string(), "{m}");
    let c = &m["calibration"];
    assert_eq!(c["reject_score"], "centroid");
    assert_eq!(c["fitted_on"]["images"], 36);
    let threshold = c["reject_below"].as_f64().expect("a threshold");
    assert!((-1.0..=1.0).contains(&threshold));
    let reject = &c["fitted_on"]["reject"];
    assert_eq!(
        (
            reject["ood_images"].clone(),
            reject["centroid_images"].clone()
        ),
        (20.into(), 36.into())
    );
    assert!(reject["false_accept"].as_f64().unwrap() <= 0.1);

    // The centroids are each label's mean image embedding: an image of a label scores near its
    // centroid, and classify's verdict is its score against the threshold.
    let ood_refs: Vec<&Path> = ood.iter().map(PathBuf::as_path).collect();
    let lines = common::classify_lines(&["--model", &out_s], &ood_refs);
    assert_eq!(lines.len(), 20);
    let answered = lines.iter().filter(|l| l["unknown"] == false).count();
    assert!(answered <= 2, "{answered} of 20 answered");
    for l in &lines {
        let score = l["reject_score"].as_f64().expect("a score");
        assert_eq!(l["unknown"], score < threshold, "{l}");
    }
    let own = labelled.join("Hand/0.png");
    let id = common::classify_json(&own, &["--model", &out_s]);
    let id_score = id["reject_score"].as_f64().unwrap();
    let worst_ood = lines
        .iter()
        .map(|l| l["reject_score"].as_f64().unwrap())
        .fold(-1.0, f64::max);
    assert!(id_score > 0.5, "{id}");
    // --no-reject: the same calibrated scores, no verdict.
    let raw = common::classify_lines(&["--no-reject", "--model", &out_s], &ood_refs);
    for (a, b) in raw.iter().zip(&lines) {
        assert!(a.get("unknown").is_none() && a.get("reject_score").is_none());
        assert_eq!(a["top"], b["top"]);
    }
    // The source bundle is unchanged and still answers without a verdict.
    let plain = common::classify_lines(&[], &[&ood[0]]);
    assert!(plain[0].get("unknown").is_none());

    // runtime eval --ood: the same verdicts on the OOD images, the figures and both pictures.
    let report = d.join("eval");
    let text = runtime_ok(&on_images(
        "eval",
        d,
        &["--model", &out_s, "--out", report.to_str().unwrap()],
    ));
    assert!(text.contains("answered unknown, AUROC"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    let cal = &json["calibration"];
    let unknown_share = cal["ood"]["unknown"].as_f64().unwrap();
    assert_eq!(unknown_share, (20 - answered) as f64 / 20.0, "{cal}");
    assert_eq!(cal["ood"]["images"], 20);
    assert!(
        (cal["ood"]["auroc"].as_f64().unwrap() - reject["auroc"].as_f64().unwrap()).abs() < 1e-9
    );
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
    assert!(
        (cal["answered"].as_f64().unwrap() - reject["in_distribution_accepted"].as_f64().unwrap())
            .abs()
            < 1e-9
    );
    let coverage = cal["coverage"].as_array().unwrap();
    assert_eq!(coverage.last().unwrap()["coverage"], 1.0);
    assert_eq!(
        cal["reliability"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>(),
        36
    );
    for png in ["reliability.png", "coverage.png", "confusion.png"] {
        let bytes = std::fs::read(report.join(png)).unwrap_or_default();
        assert!(bytes.starts_with(b"\x89PNG"), "{png} missing");
    }
    // --ood needs a rule to score.
    let refused = runtime(&on_images("eval", d, &[]));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("calibrated bundle"));

    // runtime serve answers as classify does, and ?no_reject=true as --no-reject.
    let server = common::Server::start(&["--model", &out_s]);
    let post = |file: &Path, query: &str| -> serde_json::Value {
        let (status, _, text) = server.post_image(query, &std::fs::read(file).unwrap());
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).expect("json")
    };
    for (file, cli) in [(ood[0].as_path(), &lines[0]), (own.as_path(), &id)] {
        let served = post(file, "");
        assert_eq!(served["unknown"], cli["unknown"], "{served}");
        let (a, b) = (
            served["reject_score"].as_f64().unwrap(),
            cli["reject_score"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    assert!(post(&ood[0], "?no_reject=true").get("unknown").is_none());
    drop(server);
    eprintln!(
        "centroid rule: threshold {threshold:.4}, own image {id_score:.4}, best OOD {worst_ood:.4}"
    );
}

#[test]
fn the_probability_rule_needs_no_centroids_and_format_2_bundles_still_load() {
    common::require_setup();
    let dir = common::tmpdir("calibrate-probability");
    let d = dir.path();
    // Three of the bundle's six labels: enough for a temperature, not for class centroids.
    let ood = images(d, &["CXR", "Hand", "HeadCT"], 8);
    let centroid_out = d.join("centroid");
    let fit = |extra: &[&str]| {
        let mut args = vec!["--target-false-accept", "0.1"];
        args.extend(extra);
        on_images("calibrate", d, &args)
    };
    let refused = runtime(&fit(&["--out", centroid_out.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(!refused.status.success());
    assert!(
        err.contains("has none of: abdomen CT, breast MRI, chest CT"),
        "{err}"
    );
    assert!(!centroid_out.exists(), "nothing written");

    let out = d.join("calibrated");
    let out_s = out.to_str().unwrap();
    runtime_ok(&fit(&["--out", out_s, "--reject-score", "probability"]));
    let m = manifest(&out);
    assert_eq!(m["format_version"], 2);
    assert!(m["files"].get("class_centroids").is_none());
    let threshold = m["calibration"]["reject_below"].as_f64().unwrap() as f32;
    let ood_refs: Vec<&Path> = ood.iter().map(PathBuf::as_path).collect();
    let lines = common::classify_lines(&["--model", out_s], &ood_refs);
    assert!(lines.iter().filter(|l| l["unknown"] == false).count() <= 2);
    for l in &lines {
        let top = l["top"][0]["probability"].as_f64().unwrap() as f32;
        assert_eq!(l["unknown"], top < threshold, "{l}");
        assert_eq!(l["reject_score"].as_f64().unwrap() as f32, top);
    }
    // A format-2 manifest written before `reject_score` existed reads as the probability rule.
    let mut old = m.clone();
    old["calibration"]
        .as_object_mut()
        .unwrap()
        .remove("reject_score");
    std::fs::write(out.join("manifest.json"), old.to_string()).unwrap();
    let again = common::classify_lines(&["--model", out_s], &ood_refs);
    for (a, b) in again.iter().zip(&lines) {
        assert_eq!((&a["unknown"], &a["top"]), (&b["unknown"], &b["top"]));
    }
    // A centroid rule claimed in format 2 is refused (a version-2 runtime would misread it).
    let mut forged = m;
    forged["calibration"]["reject_score"] = "centroid".into();
    std::fs::write(out.join("manifest.json"), forged.to_string()).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_classify"))
        .args(["--model", out_s, ood[0].to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("needs format version 3"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn split_val_names_the_validation_rows_the_model_held_out_and_test_rows_are_refused() {
    use runtime::eval::datasets::{self, DatasetKind, Split};
    common::require_setup();
    let dir = common::tmpdir("calibrate-val");
    let d = dir.path();
    images(d, &DEMO_CLASSES, 6);
    let labelled = d.join("labelled");
    let ds = datasets::load(DatasetKind::Folder, &labelled).unwrap();
    // The demonstration bundle, its provenance saying it was trained on this data set.
    let copy = common::copy_bundle(&common::root().join("models/default"), "trained-here");
    let bundle = copy.path();
    let mut m = manifest(bundle);
    m["provenance"]["dataset"] = ds.name.clone().into();
    m["provenance"]["split"] = "random:0.25:3".into();
    m["provenance"]["training"] = serde_json::json!({"val": 0.3, "seed": 9});
    std::fs::write(bundle.join("manifest.json"), m.to_string()).unwrap();
    let (train, _) =
        datasets::split(&ds.samples, "random:0.25:3".parse::<Split>().unwrap()).unwrap();
    let (fitted, val) = datasets::validation_split(&train, 0.3, 9).unwrap();
    let b = bundle.to_str().unwrap();
    let data = labelled.to_str().unwrap();
    let count = |part: &str| -> serde_json::Value {
        let report = d.join(format!("eval-{part}"));
        runtime_ok(&[
            "eval",
            "--model",
            b,
            "--dataset",
            "folder",
            "--data",
            data,
            "--split",
            part,
            "--device",
            "cpu",
            "--out",
            report.to_str().unwrap(),
        ]);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
                .unwrap();
        json["images"].clone()
    };
    assert_eq!(count("val"), val.len());
    assert_eq!(
        count("train"),
        fitted.len(),
        "train: the rows it trained on"
    );
    // Calibrating on the validation rows works, and is the default (data set from the model's
    // provenance, --split val, centroids from the rows it trained on); on the test rows it is
    // refused.
    let out = d.join("calibrated");
    let stdout = runtime_ok(&[
        "calibrate",
        b,
        "--data",
        data,
        "--ood",
        d.join("ood").to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        stdout.contains("validation rows (val 0.3, seed 9)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("on {} images", val.len())),
        "{stdout}"
    );
    let reject = &manifest(&out)["calibration"]["fitted_on"]["reject"];
    assert_eq!(reject["centroid_images"], fitted.len());
    let refused = runtime(&[
        "calibrate",
        b,
        "--dataset",
        "folder",
        "--data",
        data,
        "--split",
        "test",
        "--device",
        "cpu",
        "--out",
        d.join("no").to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("test part"));
    // A model that records no validation rows has no val part.
    let refused = runtime(&[
        "eval",
        "--dataset",
        "folder",
        "--data",
        data,
        "--split",
        "val",
        "--device",
        "cpu",
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no validation rows"));
}

#[test]
fn new_labels_drop_the_calibration_fitted_on_the_old_ones() {
    let dir = common::tmpdir("calibrate-prompts");
    let d = dir.path();
    let tiny = common::tiny_bundle();
    let names: Vec<String> = manifest(tiny)["labels"]
        .as_array()
        .unwrap()
        .iter()
        // Lower case: a folder named "Hand" reads as MedNIST's "hand X-ray".
        .map(|l| l["name"].as_str().unwrap().to_lowercase())
        .collect();
    let classes: Vec<&str> = names.iter().map(String::as_str).collect();
    images(d, &classes, 2);
    let calibrated = d.join("calibrated");
    runtime_ok(&on_images(
        "calibrate",
        d,
        &[
            tiny.to_str().unwrap(),
            "--out",
            calibrated.to_str().unwrap(),
        ],
    ));
    assert_eq!(manifest(&calibrated)["format_version"], 3);
    let relabelled = d.join("relabelled");
    let run = runtime(&[
        "prompts",
        "--model",
        calibrated.to_str().unwrap(),
        "--labels",
        "chest, hand, knee",
        "--device",
        "cpu",
        "--out",
        relabelled.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stderr).contains("not carried over"));
    let m = manifest(&relabelled);
    assert!(m.get("calibration").is_none(), "{m}");
    assert!(m["files"].get("class_centroids").is_none());
    assert_eq!(m["format_version"], 1);
    let line = common::classify_json(
        &d.join("ood/0.png"),
        &["--model", relabelled.to_str().unwrap()],
    );
    assert!(line.get("unknown").is_none(), "{line}");
    assert_eq!(line["top"].as_array().unwrap().len(), 3);
}
