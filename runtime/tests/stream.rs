//! `classify` on big inputs: results streamed as they are ready, paths from a list or stdin,
//! shards that split a listing with no overlap, and a killed run resumed with `--skip-done`.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn classify(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_classify"))
        .args(args)
        .output()
        .expect("run classify")
}

/// `n` small grey PNGs, each a different shade, named img-NN.png.
fn images(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("img-{i:02}.png"));
            image::GrayImage::from_fn(24 + i as u32 % 5, 24, |x, y| {
                image::Luma([((x * 7 + y * 3 + i as u32 * 11) % 256) as u8])
            })
            .save(&p)
            .expect("write png");
            p
        })
        .collect()
}

/// JSON lines by file (a file twice is an error); lines that are not JSON are counted apart.
fn results(text: &str) -> (BTreeMap<String, serde_json::Value>, usize) {
    let mut by_file = BTreeMap::new();
    let mut broken = 0;
    for line in text.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => {
                let file = v["file"].as_str().expect("file").to_string();
                assert!(v.get("error").is_none(), "{line}");
                assert!(by_file.insert(file.clone(), v).is_none(), "{file} twice");
            }
            Err(_) => broken += 1,
        }
    }
    (by_file, broken)
}

/// `classify ARGS` reading `paths` on its stdin, which stays open (returned) until dropped.
fn spawn_with_paths(
    args: &[&str],
    paths: &[String],
) -> (std::process::Child, std::process::ChildStdin) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_classify"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn classify");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{}", paths.join("\n")).expect("write paths");
    stdin.flush().expect("flush");
    (child, stdin)
}

fn base(bundle: &Path) -> Vec<&str> {
    vec![
        "--model",
        s(bundle),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--json",
    ]
}

#[test]
fn results_stream_before_the_input_ends_and_a_killed_run_resumes() {
    let bundle = tiny_bundle();
    let tmp = tmpdir("stream-resume");
    let files = images(tmp.path(), 24);
    let list: Vec<String> = files.iter().map(|p| s(p).to_string()).collect();
    let out = tmp.path().join("out.jsonl");
    let mut args = base(bundle);
    args.extend([
        "--files-from",
        "-",
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--out",
        s(&out),
        "--skip-done",
        s(&out),
    ]);
    // First run: half the paths, and stdin left open, so the run is still going when killed.
    let (mut child, stdin) = spawn_with_paths(&args, &list[..10]);
    let t0 = Instant::now();
    let lines = loop {
        let n = std::fs::read_to_string(&out).map_or(0, |t| t.lines().count());
        if n >= 10 {
            break n;
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "classify ended before its input did"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no results streamed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines, 10, "all results of what was read so far, no more");
    child.kill().expect("kill");
    child.wait().expect("reap");
    drop(stdin);
    // As if the kill had landed in the middle of a line.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&out)
        .expect("open")
        .write_all(b"{\"file\":\"half wri")
        .expect("append");

    // Second run: all paths; the 10 done are skipped, the rest appended.
    let (child, stdin) = spawn_with_paths(&args, &list);
    drop(stdin);
    let second = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(stderr.contains("skipped 10 of 24"), "{stderr}");

    let (resumed, broken) = results(&std::fs::read_to_string(&out).expect("read out"));
    assert_eq!(broken, 1, "the half-written line stays one line of its own");
    // Every file once, with the figures of an uninterrupted run.
    let mut whole = base(bundle);
    whole.extend(list.iter().map(String::as_str));
    let full = classify(&whole);
    assert!(full.status.success());
    let (expected, _) = results(&String::from_utf8_lossy(&full.stdout));
    assert_eq!(resumed.len(), 24);
    assert_eq!(resumed, expected);
}

#[test]
fn shards_split_a_folder_with_no_overlap() {
    let bundle = tiny_bundle();
    let tmp = tmpdir("stream-shards");
    images(tmp.path(), 30);
    let folder = s(tmp.path());
    let mut all = base(bundle);
    all.push(folder);
    let full = classify(&all);
    assert!(full.status.success());
    let (expected, _) = results(&String::from_utf8_lossy(&full.stdout));
    assert_eq!(expected.len(), 30);
    let mut union = BTreeMap::new();
    for k in 1..=3 {
        let shard = format!("{k}/3");
        let mut args = base(bundle);
        args.extend(["--shard", &shard, folder]);
        let out = classify(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (part, _) = results(&String::from_utf8_lossy(&out.stdout));
        assert!(
            !part.is_empty() && part.len() < 30,
            "shard {shard}: {}",
            part.len()
        );
        for (file, v) in part {
            assert!(union.insert(file, v).is_none(), "a file in two shards");
        }
    }
    assert_eq!(union, expected, "the shards together are the whole folder");

    for bad in ["0/3", "4/3", "3"] {
        let out = classify(&["--shard", bad, folder]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("K/N"), "{stderr}");
    }
}

#[test]
fn out_files_are_created_continued_or_replaced_only_when_asked() {
    let bundle = tiny_bundle();
    let tmp = tmpdir("stream-out");
    let files = images(tmp.path(), 3);
    let out = tmp.path().join("results.jsonl");
    std::fs::write(&out, "mine\n").expect("write");
    let mut args = base(bundle);
    args.extend(["--out", s(&out), s(&files[0])]);
    let refused = classify(&args);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&out).expect("read"), "mine\n");

    args.push("--force");
    let replaced = classify(&args);
    assert!(replaced.status.success());
    let (r, broken) = results(&std::fs::read_to_string(&out).expect("read"));
    assert_eq!((r.len(), broken), (1, 0));
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A table cannot be continued.
    let out = classify(&["--skip-done", s(&out), s(&files[0])]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--json"));
    // An output that is a folder.
    let mut args = base(bundle);
    args.extend(["--out", s(tmp.path()), s(&files[0])]);
    let out = classify(&args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a folder"));
}

#[test]
fn files_from_lists_files_and_folders_and_names_what_is_missing() {
    let bundle = tiny_bundle();
    let tmp = tmpdir("stream-files-from");
    let sub = tmp.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let files = images(&sub, 3);
    let list = tmp.path().join("list.txt");
    let missing = tmp.path().join("missing.png");
    std::fs::write(
        &list,
        format!("{}\r\n\n{}\n{}\n", s(&files[0]), s(&sub), s(&missing)),
    )
    .expect("write list");
    let mut args = base(bundle);
    args.extend(["--files-from", s(&list)]);
    let out = classify(&args);
    assert!(!out.status.success(), "a missing file fails the run");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    // In input order: the file, the folder's three, then the missing one's error.
    let names: Vec<&str> = lines
        .iter()
        .map(|v| v["file"].as_str().expect("file"))
        .collect();
    assert_eq!(
        names,
        [
            s(&files[0]),
            s(&files[0]),
            s(&files[1]),
            s(&files[2]),
            s(&missing)
        ]
    );
    assert!(lines[4]["error"]
        .as_str()
        .expect("error")
        .contains("missing.png"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 of 5 input(s) could not be classified"),
        "{stderr}"
    );

    let none = classify(&["--files-from", s(&tmp.path().join("nope.txt"))]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("nope.txt"));
}
