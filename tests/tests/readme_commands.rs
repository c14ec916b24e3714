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
    let out = std::env::temp_dir().join(format!("xray-clip-e2e-{}", std::process::id()));
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
    let _ = std::fs::remove_dir_all(&out);
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
