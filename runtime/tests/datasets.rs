//! Data set loaders on fixtures written here in the real layouts (UNIFESP: train.csv + DICOM tree;
//! IRMA: `;`-separated codes + PNGs; image folders), metrics against scikit-learn, and `runtime eval`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use runtime::eval::datasets::{self, DatasetKind};
use runtime::eval::metrics;

fn write_png(path: &Path, v: u8) {
    let img = image::GrayImage::from_pixel(40, 30, image::Luma([v]));
    img.save(path).unwrap();
}

#[test]
fn unifesp_layout_with_multi_label_rows_missing_files_and_bad_targets() {
    let root_tmp = tmpdir("unifesp");
    let root = root_tmp.path().to_path_buf();
    let uids = ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"];
    for (i, uid) in uids.iter().enumerate() {
        let dir = root.join("train").join(format!("1.9.{i}")).join("1.8.0");
        std::fs::create_dir_all(&dir).unwrap();
        let obj = image_object(8, 8, vec![(i * 100) as u16; 64], "MONOCHROME2");
        write_dicom(&dir, &format!("{uid}-c.dcm"), obj, "1.2.840.10008.1.2.1");
    }
    std::fs::write(
        root.join("train.csv"),
        "SOPInstanceUID,Target\n1.2.3.1,3\n1.2.3.2,3 21\n1.2.3.3,9 \n1.2.3.9,0\n1.2.3.4,22\n1.2.3.4\n",
    )
    .unwrap();
    let ds = datasets::load(DatasetKind::Unifesp, &root).unwrap();
    assert_eq!(ds.labels.len(), 22);
    assert_eq!(ds.samples.len(), 3);
    assert_eq!(ds.samples[0].labels, vec![3]);
    assert_eq!(ds.samples[1].labels, vec![3, 21], "multi-label row");
    assert_eq!(ds.samples[2].labels, vec![9]);
    assert!(ds.samples[1]
        .path
        .ends_with("train/1.9.1/1.8.0/1.2.3.2-c.dcm"));
    assert_eq!(ds.problems.len(), 3, "{:?}", ds.problems);
    assert!(ds.problems[0].contains("no file for 1.2.3.9"));
    assert!(ds.problems[1].contains("bad target \"22\""));
    assert!(ds.problems[2].contains("line 7"), "{:?}", ds.problems);
    // The files decode as DICOM.
    runtime::image::decode::decode_file(&ds.samples[0].path).unwrap();
    // Reference split on too few images is a clear error.
    let err = datasets::split(&ds.samples, "head:1200:400".parse().unwrap()).unwrap_err();
    assert!(err
        .to_string()
        .contains("needs 1600 samples, the data set has 3"));
}

#[test]
fn irma_layout_with_codes_bad_codes_and_missing_images() {
    let root_tmp = tmpdir("irma");
    let root = root_tmp.path().to_path_buf();
    let img = root.join("ImageCLEFmed2009_train.02");
    std::fs::create_dir_all(&img).unwrap();
    for id in ["1880", "1881", "1882", "1883"] {
        write_png(&img.join(format!("{id}.png")), 100);
    }
    std::fs::write(
        root.join("ImageCLEFmed2009_train_codes.02.csv"),
        "image_id;irma_code;05_class;06_class;07_class;08_class\n\
         1880;1121-120-200-700;12;5;12;12\n\
         1881;1123-127-500-000;57;6;57;57\n\
         1882;1121-115-520-000;34;10;34;34\n\
         1883;1121-4a0-914-700;77;8;77;77\n\
         1884;1121-120-200-700;12;5;12;12\n\
         1885;11x1-120;1;1;1;1\n",
    )
    .unwrap();
    let ds = datasets::load(DatasetKind::Irma, &root).unwrap();
    assert_eq!(ds.labels.len(), 15);
    let got: Vec<(String, usize)> = ds
        .samples
        .iter()
        .map(|s| {
            (
                s.path.file_stem().unwrap().to_string_lossy().to_string(),
                s.primary() + 1,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("1880".into(), 2),
            ("1881".into(), 5),
            ("1882".into(), 11),
            ("1883".into(), 9)
        ]
    );
    assert_eq!(ds.labels[10].name, "chest/lung");
    assert_eq!(ds.problems.len(), 2, "{:?}", ds.problems);
    assert!(ds.problems[0].contains("no image 1884"));
    assert!(ds.problems[1].contains("bad IRMA code"));
}

#[test]
fn metrics_equal_scikit_learn() {
    let f: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("metrics/sklearn.json")).unwrap(),
    )
    .unwrap();
    let ints = |k: &str| {
        f[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect::<Vec<_>>()
    };
    let floats = |k: &str| {
        f[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let (y_true, y_pred) = (ints("y_true"), ints("y_pred"));
    let ranked: Vec<Vec<usize>> = y_pred.iter().map(|&p| vec![p]).collect();
    let truth: Vec<Vec<usize>> = y_true.iter().map(|&t| vec![t]).collect();
    let r = metrics::report(&ranked, &truth, 5);
    let confusion: Vec<Vec<usize>> = f["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    assert_eq!(r.confusion, confusion);
    for (c, m) in r.per_class.iter().enumerate() {
        assert!((m.precision - floats("precision")[c]).abs() < 1e-12);
        assert!((m.recall - floats("recall")[c]).abs() < 1e-12);
        assert!((m.f1 - floats("f1")[c]).abs() < 1e-12);
        assert_eq!(m.support, ints("support")[c]);
    }
    assert!((r.macro_f1 - f["macro_f1"].as_f64().unwrap()).abs() < 1e-12);
    assert!((r.top1 - f["accuracy"].as_f64().unwrap()).abs() < 1e-12);
}

#[test]
fn eval_on_a_folder_writes_reports() {
    let root_tmp = tmpdir("eval-folder");
    let root = root_tmp.path().to_path_buf();
    for (label, v) in [("bright", 230u8), ("dark", 20u8)] {
        std::fs::create_dir_all(root.join(label)).unwrap();
        for i in 0..3 {
            write_png(&root.join(label).join(format!("{i}.png")), v + i);
        }
    }
    std::fs::write(root.join("dark/broken.png"), b"not an image").unwrap();
    let out = root.join("report");
    let o = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args([
            "eval",
            "--dataset",
            "folder",
            "--device",
            "cpu",
            "--template",
            "a photo of {}",
            "--template",
            "{}",
            "--model",
        ])
        .arg(tiny_bundle())
        .arg("--data")
        .arg(&root)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("| 1 | `a photo of {}` |") && stdout.contains("| 2 | `{}` |"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("unreadable:"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["images"], 6);
    assert_eq!(report["unreadable"].as_array().unwrap().len(), 1);
    assert_eq!(report["results"].as_array().unwrap().len(), 2);
    let confusion = &report["results"][0]["report"]["confusion"];
    let total: u64 = confusion
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 6);
    for f in [
        "report.md",
        "confusion.csv",
        "confusion.png",
        "predictions.csv",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let csv = std::fs::read_to_string(out.join("confusion.csv")).unwrap();
    assert_eq!(csv.lines().next().unwrap(), "true\\predicted,bright,dark");
    // One row per readable image, its hits agreeing with the report's top-1.
    let mut predictions = csv::Reader::from_path(out.join("predictions.csv")).unwrap();
    assert_eq!(
        predictions.headers().unwrap(),
        vec![
            "path",
            "labels",
            "predicted",
            "probability",
            "correct",
            "top5"
        ]
    );
    let rows: Vec<csv::StringRecord> = predictions.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 6);
    let hits = rows.iter().filter(|r| &r[4] == "true").count();
    // (of the best template's, which the rows are)
    let top1 = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["report"]["top1"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert_eq!(hits as f64 / 6.0, top1);
    for r in &rows {
        let folder = Path::new(&r[0]).parent().unwrap().file_name().unwrap();
        assert_eq!(folder.to_str().unwrap(), &r[1]);
        assert_eq!(&r[4] == "true", r[1] == r[2]);
        assert_eq!(r[5].split(';').next().unwrap(), &r[2]);
        let p: f32 = r[3].parse().unwrap();
        assert!(p > 0.0 && p <= 1.0, "{p}");
    }
    // Bundle labels that do not match the data set's: a clear error pointing at --template.
    let o = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["eval", "--dataset", "folder", "--device", "cpu", "--model"])
        .arg(tiny_bundle())
        .arg("--data")
        .arg(&root)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("has no label \"bright\""), "{err}");
    assert!(err.contains("--template"), "{err}");

    // The output rule: an existing report is replaced only with --force; a folder of other
    // things is a parent and keeps its files.
    let eval_into = |out: &Path, force: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_runtime"));
        c.args([
            "eval",
            "--dataset",
            "folder",
            "--device",
            "cpu",
            "--template",
            "{}",
            "--model",
        ])
        .arg(tiny_bundle())
        .arg("--data")
        .arg(&root)
        .arg("--out")
        .arg(out);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let again = eval_into(&out, false);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr)
        .contains("is an existing evaluation report; pass --force"));
    assert!(eval_into(&out, true).status.success());
    let user = root.join("my-notes");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("todo.txt"), "mine").unwrap();
    for force in [false, true] {
        let o = eval_into(&user, force);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            std::fs::read_to_string(user.join("todo.txt")).unwrap(),
            "mine"
        );
        assert!(
            !user.join("report.json").exists(),
            "the report went into a sub-folder"
        );
    }
    let subs: Vec<_> = std::fs::read_dir(&user)
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(subs.len(), 2, "todo.txt and one report folder");
}

#[test]
fn hidden_and_empty_folders_are_not_labels() {
    let root_tmp = tmpdir("folder-hidden");
    let root = root_tmp.path().to_path_buf();
    for label in ["chest", "hand", ".ipynb_checkpoints"] {
        std::fs::create_dir_all(root.join(label)).unwrap();
        write_png(&root.join(label).join("0.png"), 100);
    }
    std::fs::create_dir_all(root.join("empty")).unwrap();
    let ds = datasets::load(DatasetKind::Folder, &root).unwrap();
    let names: Vec<&str> = ds.labels.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(names, ["chest", "hand"]);
    assert_eq!(ds.samples.len(), 2);
    assert!(
        ds.problems.iter().any(|p| p.contains("empty: no images")),
        "{:?}",
        ds.problems
    );
}

#[test]
fn irma_codes_file_choice() {
    let root_tmp = tmpdir("irma-choice");
    let root = root_tmp.path().to_path_buf();
    write_png(&root.join("1.png"), 10);
    write_png(&root.join("2.png"), 20);
    let header = "image_id;irma_code\n";
    std::fs::write(
        root.join("a_test_codes.csv"),
        format!("{header}2;1121-120-200-700\n"),
    )
    .unwrap();
    std::fs::write(
        root.join("b_train_codes.csv"),
        format!("{header}1;1121-127-520-000\n"),
    )
    .unwrap();
    let opts = datasets::LoadOptions::default();
    // Two files: the train one, although the test one sorts first.
    let ds = datasets::load_with(DatasetKind::Irma, &root, &opts).unwrap();
    assert_eq!(ds.samples.len(), 1);
    assert_eq!(
        ds.samples[0].labels,
        vec![10],
        "1121-127-520 is chest/lung (11)"
    );
    // The CSV itself as --data: images beside it.
    let ds = datasets::load_with(DatasetKind::Irma, &root.join("a_test_codes.csv"), &opts).unwrap();
    assert_eq!(ds.samples[0].labels, vec![1], "1121-120-200 is cranium (2)");
    // --codes picks one.
    let picked = datasets::LoadOptions {
        codes: Some(root.join("a_test_codes.csv")),
        ..Default::default()
    };
    let ds = datasets::load_with(DatasetKind::Irma, &root, &picked).unwrap();
    assert_eq!(ds.samples[0].path, root.join("2.png"));
    // Two files and no train one: ask.
    std::fs::rename(root.join("b_train_codes.csv"), root.join("b_codes.csv")).unwrap();
    let err = datasets::load_with(DatasetKind::Irma, &root, &opts).unwrap_err();
    assert!(err.to_string().contains("--codes"), "{err}");
}

/// The PNG repack (`train_df.csv`: CRLF, the Target's trailing space, multi-label rows) and the
/// reference experiment's split on it: multi-label rows dropped in file order, single-label rows
/// [1, 1200) to train and [1200, 1600) to test.
#[test]
fn reference_split_on_a_repack_with_multi_label_rows() {
    let root_tmp = tmpdir("unifesp-repack-split");
    let root = root_tmp.path().to_path_buf();
    std::fs::create_dir_all(root.join("images/train")).unwrap();
    let mut csv = String::from("SOPInstanceUID,Target,Modality,image_path\r\n");
    let mut single = Vec::new();
    for i in 0..1780 {
        let uid = format!("1.2.826.{i}");
        let target = if i % 10 == 3 {
            format!("{} {} ", i % 22, (i + 5) % 22)
        } else {
            single.push(uid.clone());
            format!("{} ", i % 22)
        };
        let rel = format!("./images/train/{uid}-c.png");
        image::GrayImage::from_pixel(4, 4, image::Luma([i as u8]))
            .save(root.join(&rel))
            .unwrap();
        csv.push_str(&format!("{uid},{target},CR,{rel}\r\n"));
    }
    std::fs::write(root.join("train_df.csv"), csv).unwrap();
    let ds = datasets::load(DatasetKind::Unifesp, &root).unwrap();
    assert_eq!(ds.samples.len(), 1780);
    assert!(ds.problems.is_empty(), "{:?}", ds.problems);
    let (train, test) = datasets::split(&ds.samples, "reference".parse().unwrap()).unwrap();
    assert_eq!((train.len(), test.len()), (1199, 400));
    let uid_of = |s: &datasets::Sample| {
        s.path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches("-c.png")
            .to_string()
    };
    let train_uids: Vec<String> = train.iter().map(uid_of).collect();
    let test_uids: Vec<String> = test.iter().map(uid_of).collect();
    assert_eq!(train_uids, single[1..1200].to_vec());
    assert_eq!(test_uids, single[1200..1600].to_vec());
    assert_eq!(format!("{}", datasets::Split::Reference), "reference");
}
