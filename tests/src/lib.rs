//! Helpers shared by the end-to-end tests of the workspace (this crate's `tests/`, and the trainer's
//! tests as a dev-dependency): generated data in the real layouts, and the built binaries.

use std::path::{Path, PathBuf};

/// Three easy classes of 64x64 gray PNGs in the image-folder layout (`ROOT/<label>/*.png`):
/// horizontal stripes, vertical stripes, a bright disc; with seeded noise.
pub fn synthetic_folder(root: &Path, per_class: usize, seed: u32) {
    for (c, class) in ["stripes_horizontal", "stripes_vertical", "disc"]
        .iter()
        .enumerate()
    {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for i in 0..per_class {
            let k = (i as u32 + 1) * 7919 + seed * 104_729;
            let img = image::GrayImage::from_fn(64, 64, |x, y| {
                let noise = ((x * 31 + y * 17 + k) % 23) as u8;
                let v = match c {
                    0 if (y / 8) % 2 == 0 => 200,
                    1 if (x / 8) % 2 == 0 => 200,
                    0 | 1 => 40,
                    _ if (x as i32 - 32).pow(2) + (y as i32 - 32).pow(2) < 400 => 220,
                    _ => 30,
                };
                image::Luma([v + noise])
            });
            img.save(dir.join(format!("{i:03}.png")))
                .expect("write png");
        }
    }
}

/// A binary of the workspace, built by `cargo test --workspace` next to the test executables.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// A fresh temporary folder for one test, removed when the returned guard is dropped.
pub fn tmp(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("xray-clip-{name}-"))
        .tempdir()
        .expect("temporary folder")
}

/// A small gray PNG whose pattern depends on `class` (so a model can tell classes apart).
pub fn pattern_png(path: &Path, class: usize, seed: u32, size: u32) {
    let img = image::GrayImage::from_fn(size, size, |x, y| {
        let noise = ((x * 31 + y * 17 + seed * 7919) % 19) as u8;
        let band = (x * (class as u32 % 5 + 1) + y * (class as u32 / 5 + 1)) / 3 % 2;
        image::Luma([if band == 0 { 40 + noise } else { 200 + noise }])
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    img.save(path).expect("write png");
}

/// UNIFESP in the PNG-repack layout: `train_df.csv` (`SOPInstanceUID,Target,...,image_path`, the
/// Target with the original's trailing space, CRLF line ends) and `images/train/<uid>-c.png`.
/// Every tenth row has two labels. Classes cycle through the 22.
pub fn unifesp_repack(root: &Path, rows: usize) {
    let mut csv = String::from("SOPInstanceUID,Target,Modality,image_path\r\n");
    for i in 0..rows {
        let uid = format!("1.2.826.0.1.{i}");
        let class = i % 22;
        let target = if i % 10 == 9 {
            format!("{class} {} ", (class + 1) % 22)
        } else {
            format!("{class} ")
        };
        let rel = format!("./images/train/{uid}-c.png");
        pattern_png(&root.join(&rel), class, i as u32, 16);
        csv.push_str(&format!("{uid},{target},CR,{rel}\r\n"));
    }
    std::fs::write(root.join("train_df.csv"), csv).expect("write csv");
}

/// IRMA in the Kaggle copy's layout: the train and the test code files side by side, images in
/// `ImageCLEFmed2009_train.02/ImageCLEFmed2009_train.02/<id>.png`. Returns the number of train rows.
pub fn irma_kaggle(root: &Path, rows: usize) -> usize {
    let images = root.join("ImageCLEFmed2009_train.02/ImageCLEFmed2009_train.02");
    let mut train = String::from("image_id;irma_code;05_class;06_class;07_class;08_class\n");
    // Codes with a letter in an unused place, as in the real file (1121-120-91a-700).
    let codes = [
        "1121-120-200-700",
        "1121-127-520-000",
        "1121-110-914-700",
        "1121-120-91a-700",
        "1121-230-310-700",
    ];
    for i in 0..rows {
        let id = 1000 + i;
        let code = codes[i % codes.len()];
        pattern_png(
            &images.join(format!("{id}.png")),
            i % codes.len(),
            i as u32,
            16,
        );
        train.push_str(&format!("{id};{code};1;2;3;4\n"));
    }
    std::fs::write(root.join("ImageCLEFmed2009_train_codes.02.csv"), train).expect("csv");
    // The test codes sort first: a loader that takes the first CSV takes the wrong one.
    std::fs::write(
        root.join("ImageCLEFmed2009_test_codes.02.csv"),
        "image_id;irma_code\n9999;1121-120-200-700\n",
    )
    .expect("csv");
    rows
}

/// sha256 of every file under a folder, by relative path (to show a folder is untouched).
pub fn tree_digest(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .expect("read_dir")
            .filter_map(|e| e.ok())
        {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).expect("read");
                let rel = p.strip_prefix(dir).expect("inside").to_path_buf();
                out.push((rel, runtime::fs::sha256_hex(&bytes)));
            }
        }
    }
    out.sort();
    out
}

/// Copies a folder tree.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from)
        .expect("read_dir")
        .filter_map(|e| e.ok())
    {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
}

/// A MedNIST-shaped image folder (its six class folder names), small generated PNGs.
pub fn mednist_like(root: &Path, per_class: usize) {
    for (c, class) in ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
        .iter()
        .enumerate()
    {
        for i in 0..per_class {
            pattern_png(
                &root.join(class).join(format!("{i:04}.png")),
                c,
                i as u32,
                64,
            );
        }
    }
}
