//! int8 bundles (`runtime quantize`): smaller, close to the fp32 bundle, and written only when
//! the check on labelled images passes (or with --force).

mod common;

use std::path::Path;
use std::process::Output;

use common::*;
use runtime::bundle::Bundle;
use runtime::engine::Engine;

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    stderr
}

fn image_embeddings(bundle: Bundle, files: &[std::path::PathBuf]) -> Vec<Vec<f32>> {
    let mut engine = Engine::load(bundle, cpu()).expect("engine");
    runtime::pipeline::embed_files(&mut engine, files, &Default::default())
        .into_iter()
        .map(|r| r.expect("embedding"))
        .collect()
}

#[test]
fn int8_bundle_is_smaller_and_close_to_fp32() {
    let tmp = tmpdir("quantize");
    let out = tmp.path().join("int8");
    let r = runtime_cli(&["quantize", s(tiny_bundle()), "--out", s(&out)]);
    ok(&r);
    let int8 = Bundle::load(&out).expect("int8 bundle loads");
    let fp32 = load_tiny();
    let q = int8.manifest.quantization.clone().expect("recorded");
    assert_eq!(q.precision, "int8");
    assert_eq!(int8.manifest.name, format!("{}-int8", fp32.manifest.name));
    // The tiny HF ViT: 2 layers x (q, k, v, out, fc1, fc2) + the projection; its patch conv, a
    // lone Conv, stays float.
    assert_eq!((q.image_encoder.matmuls, q.image_encoder.convs), (13, 0));
    let text = q.text_encoder.as_ref().expect("text encoder quantized");
    assert_eq!(text.gathers, 1, "the token table");
    let size = |b: &Bundle, role: &str| b.manifest.files[role].bytes as f64;
    // Mostly the 49408 x 16 token table: int8 rows plus one f32 scale per row (a quarter more at
    // this width; at CLIP's 512 the scales are under 1%).
    let ratio = size(&int8, "text_encoder") / size(&fp32, "text_encoder");
    assert!(ratio < 0.35, "text encoder {ratio:.3} of fp32");
    assert!(size(&int8, "image_encoder") < size(&fp32, "image_encoder"));
    assert_eq!(
        int8.label_embeddings, fp32.label_embeddings,
        "label embeddings are the fp32 bundle's"
    );

    let files: Vec<_> = ["gray_300x217.png", "rgb_640x480.jpg", "small_64x64.png"]
        .iter()
        .map(|f| fixtures().join("images").join(f))
        .collect();
    let a = image_embeddings(fp32, &files);
    let b = image_embeddings(int8, &files);
    for (x, y) in a.iter().zip(&b) {
        let c = cosine(x, y);
        assert!(c >= 0.99, "int8 vs fp32 image embedding cosine {c}");
        assert!(
            c < 1.0 - 1e-7,
            "int8 gave the fp32 figures: nothing was quantized"
        );
    }

    // The int8 bundle is not quantized again, and nothing is replaced unasked.
    let again = runtime_cli(&["quantize", s(&out), "--out", s(&tmp.path().join("x"))]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already int8"));
    let replace = runtime_cli(&["quantize", s(tiny_bundle()), "--out", s(&out)]);
    assert!(!replace.status.success());
    assert!(String::from_utf8_lossy(&replace.stderr).contains("--force"));
    let info = runtime_cli(&["info", "--model", s(&out)]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("precision   int8"));
}

#[test]
fn the_check_on_labelled_images_gates_what_is_written() {
    let tmp = tmpdir("quantize-check");
    let data = tmp.path().join("data");
    let mut n = 0;
    for (k, label) in ["Chest", "Knee", "Skull"].iter().enumerate() {
        let dir = data.join(label);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for i in 0..6u32 {
            image::GrayImage::from_fn(48, 40, |x, y| {
                image::Luma([((x * (k as u32 + 1) + y * i + 17 * i) % 256) as u8])
            })
            .save(dir.join(format!("{i}.png")))
            .expect("png");
            n += 1;
        }
    }
    let run = |min: &str, out: &Path| {
        runtime_cli(&[
            "quantize",
            s(tiny_bundle()),
            "--dataset",
            "folder",
            "--data",
            s(&data),
            "--min-agreement",
            min,
            "--device",
            "cpu",
            "--out",
            s(out),
        ])
    };
    let lenient = tmp.path().join("lenient");
    let r = run("0", &lenient);
    ok(&r);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains(&format!("{n} images, top-1 agreement")),
        "{text}"
    );
    let check = Bundle::load(&lenient)
        .expect("written")
        .manifest
        .quantization
        .and_then(|q| q.check)
        .expect("the check is recorded");
    assert_eq!(check.images, n);
    assert!((0.0..=1.0).contains(&check.agreement));

    // All or nothing at 1.0: written exactly when every image agrees (the run's own figure: near
    // ties of this random model may fall either way between runs).
    let strict = tmp.path().join("strict");
    let r = run("1", &strict);
    let text = String::from_utf8_lossy(&r.stdout);
    let agreement: f64 = text
        .split("top-1 agreement ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no agreement in {text}"));
    let perfect = agreement == 1.0;
    assert_eq!(r.status.success(), perfect);
    assert_eq!(strict.exists(), perfect);
    if !perfect {
        assert!(String::from_utf8_lossy(&r.stderr).contains("nothing written"));
    }
    // Not a fraction: refused.
    let r = run("1.5", &tmp.path().join("bad"));
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--min-agreement"));
}

/// `--calibrate`: the image encoder's activations get fixed scales from their ranges on the
/// calibration images (every one of them; the text encoder's stay dynamic), and the result is
/// close to fp32 and not the dynamic bundle.
#[test]
fn calibration_images_give_static_activation_scales() {
    use runtime::bundle::quantize;
    let tmp = tmpdir("quantize-static");
    let images = fixtures().join("images");
    let out = tmp.path().join("static");
    let r = runtime_cli(&[
        "quantize",
        s(tiny_bundle()),
        "--calibrate",
        s(&images),
        "--device",
        "cpu",
        "--out",
        s(&out),
    ]);
    let stderr = ok(&r);
    assert!(stderr.contains("from 6 calibration images"), "{stderr}");
    let fp32 = load_tiny();
    let image_bytes = fp32.read_verified(runtime::bundle::IMAGE_ENCODER).unwrap();
    let activations = quantize::quantized_activations(&image_bytes, Path::new("image")).unwrap();
    let bundle = Bundle::load(&out).expect("static int8 bundle loads");
    let q = bundle.manifest.quantization.clone().expect("recorded");
    assert_eq!(q.calibration_images, 6);
    assert_eq!(q.image_encoder.static_activations, activations.len());
    assert!(!activations.is_empty());
    assert_eq!(
        q.text_encoder.as_ref().map(|t| t.static_activations),
        Some(0)
    );
    assert!(q.scheme.contains("fixed scales"), "{}", q.scheme);

    let dynamic = tmp.path().join("dynamic");
    ok(&runtime_cli(&[
        "quantize",
        s(tiny_bundle()),
        "--out",
        s(&dynamic),
    ]));
    let files: Vec<_> = ["gray_300x217.png", "rgb_640x480.jpg", "small_64x64.png"]
        .iter()
        .map(|f| images.join(f))
        .collect();
    let a = image_embeddings(fp32, &files);
    let b = image_embeddings(bundle, &files);
    let c = image_embeddings(Bundle::load(&dynamic).unwrap(), &files);
    for ((x, y), z) in a.iter().zip(&b).zip(&c) {
        let cos = cosine(x, y);
        assert!(
            cos >= 0.99,
            "static int8 vs fp32 image embedding cosine {cos}"
        );
        assert_ne!(y, z, "static and dynamic scales gave the same embedding");
    }

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let r = runtime_cli(&[
        "quantize",
        s(tiny_bundle()),
        "--calibrate",
        s(&empty),
        "--out",
        s(&tmp.path().join("none")),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("--calibrate") && err.contains("no images found"),
        "{err}"
    );
    assert!(!tmp.path().join("none").exists());
}
