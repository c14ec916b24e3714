//! Shared helpers of the runtime's integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use runtime::bundle::assemble::{assemble, AssembleSpec};
use runtime::bundle::{Bundle, Provenance};
use runtime::engine::{Device, EngineOptions};
use runtime::image::preprocess::PreprocessConfig;
use runtime::text::labels;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixtures() -> PathBuf {
    root().join("fixtures")
}

pub fn cpu() -> EngineOptions {
    EngineOptions {
        device: Device::Cpu,
        threads: 1,
    }
}

/// `scripts/setup.sh` must have run: the tests need ONNX Runtime and the test venv, and say so
/// instead of skipping.
pub fn require_setup() {
    if let Err(e) = runtime::engine::onnxruntime_library() {
        panic!("{e}");
    }
}

pub fn test_python() -> PathBuf {
    let p = runtime::cache_dir()
        .join("testpy")
        .join("bin")
        .join("python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

/// Folder of pydicom-data's files (installed into the test venv by scripts/setup.sh).
pub fn pydicom_data() -> PathBuf {
    let lib = runtime::cache_dir().join("testpy").join("lib");
    let py = std::fs::read_dir(&lib)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup.sh", lib.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
        })
        .expect("python3.x in the test venv");
    let d = py.join("site-packages").join("data_store").join("data");
    assert!(
        d.join("RG1_UNCI.dcm").exists(),
        "pydicom-data missing under {}",
        d.display()
    );
    d
}

pub fn tiny_reference() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny/reference.json")).expect("reference.json"),
    )
    .expect("json")
}

/// The tiny HF CLIP (torch.onnx export) assembled into a bundle once per test binary.
pub fn tiny_bundle() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        require_setup();
        // Lives as long as the test binary (a static is never dropped), so it goes under cargo's
        // folder for integration-test data (target/tmp), not the system's temp folder.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("tiny-bundle-{}", std::process::id()));
        let f = fixtures();
        let scale = tiny_reference()["logit_scale"].as_f64().expect("scale") as f32;
        let spec = AssembleSpec {
            name: "tiny-hf".into(),
            description: "tiny random HF CLIPModel exported by torch.onnx".into(),
            image_encoder: f.join("tiny/image_encoder.onnx"),
            text_encoder: Some(f.join("tiny/text_encoder.onnx")),
            tokenizer: Some(root().join("models/tokenizer/tokenizer.json")),
            labels: labels::unifesp(),
            templates: runtime::text::prompts::default_templates(),
            label_embeddings: None,
            logit_scale: scale,
            preprocessing: PreprocessConfig::default(),
            provenance: Provenance {
                base_weights: "random init (fixtures/tiny)".into(),
                ..Default::default()
            },
        };
        assemble(spec, &dir, true, &cpu()).expect("assemble tiny bundle");
        dir
    })
}

pub fn load_tiny() -> Bundle {
    Bundle::load(tiny_bundle()).expect("tiny bundle loads")
}

/// Copies a bundle folder so a test can damage it (removed when the guard is dropped).
pub fn copy_bundle(src: &Path, name: &str) -> tempfile::TempDir {
    let dst = tmpdir(&format!("test-{name}"));
    for e in std::fs::read_dir(src).expect("read bundle") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dst.path().join(e.file_name())).expect("copy");
    }
    dst
}

#[allow(unused_imports)] // not every test binary compares embeddings
pub use runtime::scoring::cosine;

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .sum::<f64>()
        / a.len() as f64
}

pub fn write_dicom(dir: &Path, name: &str, obj: InMemDicomObject, ts: &str) -> PathBuf {
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(ts)
                .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.1")
                .media_storage_sop_instance_uid("1.2.3.4.5"),
        )
        .expect("meta");
    let path = dir.join(name);
    file.write_to_file(&path).expect("write dicom");
    path
}

pub fn image_object(rows: u16, cols: u16, pixels: Vec<u16>, photometric: &str) -> InMemDicomObject {
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::SOP_CLASS_UID,
        VR::UI,
        PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.1"),
    ));
    obj.put(DataElement::new(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(1u16),
    ));
    obj.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from(photometric),
    ));
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(rows),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(cols),
    ));
    obj.put(DataElement::new(
        tags::BITS_ALLOCATED,
        VR::US,
        PrimitiveValue::from(16u16),
    ));
    obj.put(DataElement::new(
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(12u16),
    ));
    obj.put(DataElement::new(
        tags::HIGH_BIT,
        VR::US,
        PrimitiveValue::from(11u16),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        PrimitiveValue::from(0u16),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(pixels.into()),
    ));
    obj
}

/// A fresh temporary folder for one test, removed when the returned guard is dropped.
/// `runtime ARGS`, waited for.
pub fn runtime_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(args)
        .output()
        .expect("run runtime")
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn tmpdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("xray-clip-{name}-"))
        .tempdir()
        .expect("temporary folder")
}

/// `classify --json --device cpu -k 3 EXTRA FILES`: its JSON lines (a failed run fails the test).
pub fn classify_lines(extra: &[&str], files: &[&Path]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_classify"))
        .args(["--json", "--device", "cpu", "-k", "3"])
        .args(extra)
        .args(files)
        .output()
        .expect("classify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// `classify --json --device cpu -k 3 EXTRA FILE`: its one JSON line.
pub fn classify_json(file: &Path, extra: &[&str]) -> serde_json::Value {
    let mut lines = classify_lines(extra, &[file]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    lines.remove(0)
}

/// Two result lines give the same labels in the same order, probabilities within 1e-5, same model.
pub fn assert_same_scores(served: &serde_json::Value, cli: &serde_json::Value) {
    let (a, b) = (
        served["top"].as_array().unwrap(),
        cli["top"].as_array().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["label"], y["label"], "{served} vs {cli}");
        let (p, q) = (
            x["probability"].as_f64().unwrap(),
            y["probability"].as_f64().unwrap(),
        );
        // Batched with others or alone, the encoder's sums may differ in the last bits.
        assert!((p - q).abs() < 1e-5, "{p} vs {q}");
    }
    assert_eq!(served["model"], cli["model"]);
}

/// One HTTP/1.1 request on a fresh connection: (status, head in lower case, body); status 0 when
/// nothing could be connected to or no status came back.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new(), String::new());
    };
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .ok();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).is_err() {
        return (0, String::new(), String::new());
    }
    // A server may answer (413, 503) before it has read a large body: a failed write is fine.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// A `runtime serve` process for a test, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

/// `runtime serve --http 127.0.0.1:0 --device cpu --threads 1 ARGS`.
pub fn spawn_serve(args: &[&str], stdout: Stdio, stderr: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--threads",
            "1",
        ])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("start runtime serve")
}

impl Server {
    /// `runtime serve --http 127.0.0.1:0 ARGS` (the demonstration bundle), once it is ready.
    pub fn start(args: &[&str]) -> Server {
        require_setup();
        let mut child = spawn_serve(args, Stdio::piped(), Stdio::inherit());
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("first line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let server = Server { child, addr };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.get("/readyz").0 != 200 {
            assert!(Instant::now() < deadline, "not ready within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// One HTTP/1.1 request on a fresh connection: (status, headers, body).
    pub fn request(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> Reply {
        let reply = http_request(&self.addr, method, path, content_type, body);
        assert_ne!(reply.0, 0, "no HTTP status from {path}: {reply:?}");
        reply
    }

    pub fn get(&self, path: &str) -> Reply {
        match TcpStream::connect(&self.addr) {
            Ok(_) => self.request("GET", path, "text/plain", b""),
            Err(_) => (0, String::new(), String::new()),
        }
    }

    pub fn post_image(&self, query: &str, bytes: &[u8]) -> Reply {
        self.request(
            "POST",
            &format!("/v1/classify{query}"),
            "application/octet-stream",
            bytes,
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (status, headers, body).
pub type Reply = (u16, String, String);
