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

/// A fresh temporary folder for one test.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xray-clip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}
