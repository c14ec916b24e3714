//! `runtime serve --dicom` against real DICOM peers: dcmtk's `echoscu` and `storescu`, and an
//! Orthanc PACS (Debian packages, installed by scripts/setup.sh) sending C-STOREs to the node.
//! Each received X-ray gets the line `classify --json` gives for the same file, with its UIDs and
//! body part; other storage classes are refused in the negotiation; stored files are byte-identical
//! data sets; broken, oversize and concurrent senders are each answered.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dicom_core::header::Header;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, OpenFileOptions};
use runtime::text::{body_part, labels::Label};

const CR: &str = "1.2.840.10008.5.1.4.1.1.1";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

struct Node {
    child: Child,
    dicom_port: u16,
    http: Option<String>,
    results: PathBuf,
}

impl Node {
    /// `runtime serve --dicom 127.0.0.1:0 --results DIR/results.jsonl [--http 127.0.0.1:0] ARGS`.
    fn start(dir: &Path, with_http: bool, args: &[&str]) -> Node {
        common::require_setup();
        let results = dir.join("results.jsonl");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runtime"));
        cmd.args(["serve", "--dicom", "127.0.0.1:0", "--results"])
            .arg(&results)
            .args(["--device", "cpu", "--threads", "1"]);
        if with_http {
            cmd.args(["--http", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start runtime serve");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let (mut dicom_port, mut http) = (None, None);
        while dicom_port.is_none() || (with_http && http.is_none()) {
            let mut line = String::new();
            out.read_line(&mut line).expect("a listening line");
            assert!(!line.is_empty(), "runtime serve ended before listening");
            if let Some(rest) = line.trim().strip_prefix("listening on dicom://") {
                let addr = rest.split_whitespace().next().expect("address");
                dicom_port = Some(addr.rsplit(':').next().unwrap().parse().unwrap());
                assert!(line.contains("(AE title "), "{line}");
            } else if let Some(rest) = line.trim().strip_prefix("listening on http://") {
                http = Some(rest.to_string());
            }
        }
        Node {
            child,
            dicom_port: dicom_port.unwrap(),
            http,
            results,
        }
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.results)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    fn metrics(&self) -> String {
        http(
            self.http.as_deref().expect("--http"),
            "GET",
            "/metrics",
            b"",
        )
        .1
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (status, _, body) = common::http_request(addr, method, path, "application/json", body);
    (status, body)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn dcmtk(tool: &str, args: &[String]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}; scripts/setup.sh installs dcmtk"))
}

fn storescu(port: u16, extra: &[&str], files: &[&Path]) -> Output {
    let mut args: Vec<String> = ["-aec", "XRAYCLIP", "-aet", "TESTSCU"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    args.push("127.0.0.1".into());
    args.push(port.to_string());
    args.extend(files.iter().map(|f| f.display().to_string()));
    dcmtk("storescu", &args)
}

fn uid_of(file: &Path, tag: dicom_core::Tag) -> String {
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(file)
        .expect("read dicom");
    obj.element(tag)
        .expect("element")
        .to_str()
        .expect("text")
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// The kept file holds the sent data set: every element of the source with the same value (storescu
/// re-encodes as it sends, so the bytes may differ in padding and lengths, not in content), the
/// pixel data byte for byte.
fn assert_same_data_set(kept: &Path, src: &Path) {
    let (kept, src) = (
        dicom_object::open_file(kept).expect("kept file"),
        dicom_object::open_file(src).expect("source"),
    );
    let mut compared = 0;
    for e in src.iter() {
        let k = kept
            .element(e.tag())
            .unwrap_or_else(|_| panic!("{} missing", e.tag()));
        if e.tag() == tags::PIXEL_DATA {
            match e.value().fragments() {
                // Encapsulated (JPEG 2000): the same fragments.
                Some(fragments) => assert!(k.value().fragments() == Some(fragments), "pixel data"),
                None => assert!(k.to_bytes().unwrap() == e.to_bytes().unwrap(), "pixel data"),
            }
        } else if let Ok(v) = e.to_str() {
            let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
            assert_eq!(trim(&k.to_str().unwrap()), trim(&v), "{}", e.tag());
        }
        compared += 1;
    }
    assert!(compared > 50, "{compared} elements");
}

/// A line for `file` says what `classify --json` says about it, with its UIDs and body part.
fn assert_line_for(line: &serde_json::Value, file: &Path, body_part_examined: Option<&str>) {
    let cli = common::classify_json(file, &[]);
    common::assert_same_scores(line, &cli);
    let expected = cli["top"].as_array().unwrap();
    assert_eq!(line["prediction"], expected[0]["label"]);
    for (key, tag) in [
        ("sop_instance_uid", tags::SOP_INSTANCE_UID),
        ("study_instance_uid", tags::STUDY_INSTANCE_UID),
        ("series_instance_uid", tags::SERIES_INSTANCE_UID),
        ("sop_class_uid", tags::SOP_CLASS_UID),
    ] {
        assert_eq!(line[key], uid_of(file, tag), "{key}");
    }
    assert_eq!(line["body_part_examined"].as_str(), body_part_examined);
    let top = expected[0]["label"].as_str().unwrap();
    let term = body_part::term_for(&Label::new(top, top));
    assert_eq!(line["body_part_predicted"].as_str(), term, "{line}");
    match (body_part_examined, term) {
        (Some(e), Some(t)) => assert_eq!(line["body_part_mismatch"], !body_part::agrees(e, t)),
        _ => assert!(line["body_part_mismatch"].is_null()),
    }
    assert!(line.get("error").is_none(), "{line}");
}

/// A small CR instance (`rows` x 40, 12-bit ramp) with its own UIDs; `short` leaves out half the
/// pixels, so it cannot be decoded.
fn cr_file(dir: &Path, n: u32, rows: u16, short: bool) -> PathBuf {
    let uid = format!("1.2.826.0.1.3680043.10.1234.{n}");
    let count = rows as usize * 40 / if short { 2 } else { 1 };
    let pixels = (0..count).map(|i| (i * 37 % 4096) as u16).collect();
    let mut obj = common::image_object(rows, 40, pixels, "MONOCHROME2");
    for (tag, value) in [
        (tags::SOP_INSTANCE_UID, uid.clone()),
        (tags::STUDY_INSTANCE_UID, format!("{uid}.1")),
        (tags::SERIES_INSTANCE_UID, format!("{uid}.2")),
    ] {
        obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(value)));
    }
    obj.put(DataElement::new(
        tags::BODY_PART_EXAMINED,
        VR::CS,
        PrimitiveValue::from("HAND"),
    ));
    obj.put(DataElement::new(
        tags::MODALITY,
        VR::CS,
        PrimitiveValue::from("CR"),
    ));
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_LE)
                .media_storage_sop_class_uid(CR)
                .media_storage_sop_instance_uid(uid.as_str()),
        )
        .expect("meta");
    let path = dir.join(format!("cr-{n}.dcm"));
    file.write_to_file(&path).expect("write");
    path
}

#[test]
fn echoscu_and_storescu_get_the_answers_of_classify_and_other_classes_are_refused() {
    let dir = common::tmpdir("dicom-node");
    let store = dir.path().join("store");
    let data = common::pydicom_data();
    // Small PDUs on both sides: storescu must split the 7 MB image into PDUs of at most 16 kB (the
    // node refuses larger ones), and the node's answers must fit storescu's 4 kB.
    let node = Node::start(
        dir.path(),
        true,
        &["--max-pdu", "16384", "--store", store.to_str().unwrap()],
    );
    let port = node.dicom_port.to_string();
    let echo = dcmtk(
        "echoscu",
        &[
            "-aec".into(),
            "XRAYCLIP".into(),
            "127.0.0.1".into(),
            port.clone(),
        ],
    );
    assert!(echo.status.success(), "{echo:?}");
    let wrong = dcmtk(
        "echoscu",
        &[
            "-aec".into(),
            "SOMEONE".into(),
            "127.0.0.1".into(),
            port.clone(),
        ],
    );
    assert!(
        !wrong.status.success(),
        "an association calling another AE title is rejected"
    );

    let chest = data.join("RG1_UNCI.dcm"); // CR, explicit VR LE, BodyPartExamined CHEST
    let extremity = data.join("RG3_J2KR.dcm"); // CR, JPEG 2000 lossless, EXTREMITY
    let ct = data.join("693_UNCI.dcm"); // CT: not an X-ray storage class
                                        // -R: propose only the files' own storage classes (the CT one is refused).
    let out = storescu(
        node.dicom_port,
        &["-R", "--max-pdu", "4096"],
        &[&chest, &ct],
    );
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // dcmtk has no JPEG 2000 codec: -xv proposes the file's own transfer syntax, sent as it is.
    let j2k = storescu(
        node.dicom_port,
        &["-xv", "--max-pdu", "4096"],
        &[&extremity],
    );
    assert!(j2k.status.success(), "{j2k:?}");
    assert!(
        log.to_lowercase().contains("no presentation context")
            || log
                .to_lowercase()
                .contains("no acceptable presentation context"),
        "the CT image is refused in the negotiation: {log}"
    );
    let lines = node.lines();
    assert_eq!(lines.len(), 2, "{lines:?}\n{log}");
    assert_line_for(&lines[0], &chest, Some("CHEST"));
    assert_line_for(&lines[1], &extremity, Some("EXTREMITY"));
    for (line, src) in lines.iter().zip([&chest, &extremity]) {
        let kept = PathBuf::from(line["stored"].as_str().expect("stored"));
        assert_eq!(kept.parent(), Some(store.as_path()));
        assert_same_data_set(&kept, src);
    }
    let metrics = node.metrics();
    assert!(
        metrics.contains("xray_clip_dicom_instances_total{status=\"0000\"} 2"),
        "{metrics}"
    );
    // The same instance again: answered again, the stored file left as it is.
    let before =
        std::fs::metadata(store.join(format!("{}.dcm", uid_of(&chest, tags::SOP_INSTANCE_UID))))
            .unwrap()
            .modified()
            .unwrap();
    let again = storescu(node.dicom_port, &[], &[&chest]);
    assert!(again.status.success(), "{again:?}");
    assert_eq!(node.lines().len(), 3);
    let after =
        std::fs::metadata(store.join(format!("{}.dcm", uid_of(&chest, tags::SOP_INSTANCE_UID))))
            .unwrap()
            .modified()
            .unwrap();
    assert_eq!(before, after);
}

#[test]
fn broken_oversize_and_concurrent_senders_each_get_an_answer() {
    let dir = common::tmpdir("dicom-node-bad");
    let node = Node::start(dir.path(), true, &["--max-body", "200000"]);
    let big = cr_file(dir.path(), 1, 3000, false); // 240 kB of pixels: over --max-body
    let broken = cr_file(dir.path(), 2, 64, true); // half its pixels missing
                                                   // storescu ends an association at a "refused" status, so one association each.
    let out = storescu(node.dicom_port, &[], &[&big]);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    let out = storescu(node.dicom_port, &[], &[&broken]);
    let log = log + &String::from_utf8_lossy(&out.stderr);
    let lines = node.lines();
    assert_eq!(lines.len(), 2, "{lines:?}\n{log}");
    assert!(
        lines[0]["error"].as_str().unwrap().contains("--max-body"),
        "{}",
        lines[0]
    );
    assert!(lines[1]["error"].as_str().is_some(), "{}", lines[1]);
    assert!(lines.iter().all(|l| l.get("top").is_none()));
    let metrics = node.metrics();
    assert!(
        metrics.contains("xray_clip_dicom_instances_total{status=\"A700\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("xray_clip_dicom_instances_total{status=\"C000\"} 1"),
        "{metrics}"
    );

    // Four associations at once, each sending two images: all answered, each as classify does.
    let files: Vec<PathBuf> = (10..18)
        .map(|n| cr_file(dir.path(), n, 48, false))
        .collect();
    let senders: Vec<_> = files
        .chunks(2)
        .map(|pair| {
            let pair = pair.to_vec();
            let port = node.dicom_port;
            std::thread::spawn(move || storescu(port, &[], &[&pair[0], &pair[1]]))
        })
        .collect();
    for s in senders {
        let out = s.join().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let lines = node.lines();
    assert_eq!(lines.len(), 10);
    for file in &files {
        let uid = uid_of(file, tags::SOP_INSTANCE_UID);
        let line = lines
            .iter()
            .find(|l| l["sop_instance_uid"] == uid.as_str())
            .unwrap_or_else(|| panic!("no line for {uid}"));
        assert_line_for(line, file, Some("HAND"));
    }
    // It is still serving HTTP after all that.
    assert_eq!(
        http(node.http.as_deref().unwrap(), "GET", "/readyz", b"").0,
        200
    );
}

/// Orthanc, started by scripts/orthanc.sh on free loopback ports, stopped when dropped.
struct Orthanc {
    child: Child,
    http: String,
}

impl Orthanc {
    fn start(work: &Path, node_port: u16) -> Orthanc {
        let (http_port, dicom_port) = (free_port(), free_port());
        let child = Command::new(common::root().join("scripts/orthanc.sh"))
            .arg(work)
            .args([
                http_port.to_string(),
                dicom_port.to_string(),
                node_port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("scripts/orthanc.sh");
        let orthanc = Orthanc {
            child,
            http: format!("127.0.0.1:{http_port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = TcpStream::connect(&orthanc.http).is_ok()
                && http(&orthanc.http, "GET", "/system", b"").0 == 200;
            if up {
                break orthanc;
            }
            assert!(Instant::now() < deadline, "Orthanc not up within 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        // SIGTERM: Orthanc closes its database cleanly.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn orthanc_sends_real_radiographs_to_the_node() {
    let dir = common::tmpdir("dicom-orthanc");
    let data = common::pydicom_data();
    // Each result is also POSTed to a hook (a plain HTTP listener here).
    let hook = TcpListener::bind("127.0.0.1:0").expect("hook");
    let hook_url = format!("http://{}/hook", hook.local_addr().unwrap());
    let posted = std::thread::spawn(move || {
        (0..2)
            .map(|_| {
                let (mut s, _) = hook.accept().expect("a post");
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                    .unwrap();
                serde_json::from_slice::<serde_json::Value>(&body).expect("posted JSON")
            })
            .collect::<Vec<_>>()
    });
    let node = Node::start(dir.path(), false, &["--post", &hook_url]);
    let pacs = Orthanc::start(&dir.path().join("orthanc"), node.dicom_port);
    let echo = http(&pacs.http, "POST", "/modalities/xrayclip/echo", b"{}");
    assert_eq!(echo.0, 200, "C-ECHO from Orthanc: {echo:?}");
    let files = [data.join("RG1_UNCI.dcm"), data.join("RG3_J2KR.dcm")];
    let mut ids = Vec::new();
    for f in &files {
        let (status, body) = http(&pacs.http, "POST", "/instances", &std::fs::read(f).unwrap());
        assert_eq!(status, 200, "upload {}: {body}", f.display());
        let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
        ids.push(answer["ID"].as_str().expect("ID").to_string());
    }
    let request = serde_json::json!({"Resources": ids, "Synchronous": true}).to_string();
    let (status, body) = http(
        &pacs.http,
        "POST",
        "/modalities/xrayclip/store",
        request.as_bytes(),
    );
    assert_eq!(status, 200, "C-STORE from Orthanc: {body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["FailedInstancesCount"], 0, "{answer}");
    let lines = node.lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (file, part) in files.iter().zip(["CHEST", "EXTREMITY"]) {
        let uid = uid_of(file, tags::SOP_INSTANCE_UID);
        let line = lines
            .iter()
            .find(|l| l["sop_instance_uid"] == uid.as_str())
            .unwrap_or_else(|| panic!("no line for {uid}"));
        assert_line_for(line, file, Some(part));
        assert_eq!(line["calling_ae_title"], "ORTHANC");
        assert!(line["stored"].is_null(), "nothing kept without --store");
    }
    assert_eq!(
        posted.join().expect("hook"),
        lines,
        "--post sends each line"
    );
}
