//! `runtime ensemble`: two bundles as one, scoring by the members' mean cosine similarity.

mod common;

use std::path::Path;

use common::*;
use prost::Message;
use runtime::bundle::assemble::{assemble_from, AssembleInput, AssembleSpec};
use runtime::bundle::{Bundle, Provenance};
use runtime::engine::Engine;
use runtime::image::preprocess::PreprocessConfig;
use runtime::onnx_proto::{tensor_proto::DataType, ModelProto};
use runtime::text::labels;
use runtime::text::tokenizer::{ClipTokenizer, Padding};

/// The ONNX model with every float weight multiplied by a factor that varies from weight to
/// weight: another encoder with the same inputs and outputs.
fn perturbed(path: &Path) -> Vec<u8> {
    let mut model =
        ModelProto::decode(std::fs::read(path).expect("read onnx").as_slice()).expect("onnx");
    let graph = model.graph.as_mut().expect("graph");
    for (i, t) in graph.initializer.iter_mut().enumerate() {
        if t.data_type != DataType::Float as i32 {
            continue;
        }
        let f = 1.0 + 0.3 * ((i as f32) * 0.7).sin();
        if !t.raw_data.is_empty() {
            t.raw_data = t
                .raw_data
                .chunks_exact(4)
                .flat_map(|b| (f32::from_le_bytes(b.try_into().unwrap()) * f).to_le_bytes())
                .collect();
        }
        for v in &mut t.float_data {
            *v *= f;
        }
    }
    model.encode_to_vec()
}

/// A second member: the tiny HF CLIP with perturbed weights, same labels and one template.
fn members(dir: &Path) -> (Bundle, Bundle) {
    let f = fixtures();
    let templates = vec!["a X-Ray image of {} part".to_string()];
    let spec = |name: &str| AssembleSpec {
        name: name.into(),
        description: String::new(),
        image_encoder: Default::default(),
        text_encoder: None,
        tokenizer: None,
        labels: labels::unifesp(),
        templates: templates.clone(),
        label_embeddings: None,
        logit_scale: if name == "a" { 20.0 } else { 40.0 },
        preprocessing: PreprocessConfig::default(),
        provenance: Provenance {
            base_weights: format!("random init ({name})"),
            dataset: "unifesp".into(),
            split: "reference".into(),
            training: serde_json::json!({"val": 0.1, "seed": 0}),
            ..Default::default()
        },
    };
    let tokenizer = std::fs::read(root().join("models/tokenizer/tokenizer.json")).expect("tok");
    let input = |image: Vec<u8>, text: Vec<u8>| AssembleInput {
        image_encoder: (image, "image".into()),
        text_encoder: Some((text, "text".into())),
        tokenizer: Some((tokenizer.clone(), "tokenizer.json".into())),
    };
    let read = |p: &str| std::fs::read(f.join(p)).expect("fixture");
    let a = assemble_from(
        spec("a"),
        input(
            read("tiny/image_encoder.onnx"),
            read("tiny/text_encoder.onnx"),
        ),
        &dir.join("a"),
        false,
        &cpu(),
    )
    .expect("member a");
    let b = assemble_from(
        spec("b"),
        input(
            perturbed(&f.join("tiny/image_encoder.onnx")),
            perturbed(&f.join("tiny/text_encoder.onnx")),
        ),
        &dir.join("b"),
        false,
        &cpu(),
    )
    .expect("member b");
    (a, b)
}

fn image_embeddings(bundle: &Bundle, files: &[std::path::PathBuf]) -> Vec<Vec<f32>> {
    let mut engine = Engine::load(bundle.clone(), cpu()).expect("engine");
    runtime::pipeline::embed_files(&mut engine, files, &Default::default())
        .into_iter()
        .map(|r| r.expect("embedding"))
        .collect()
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

#[test]
fn the_ensemble_scores_by_the_members_mean_cosine() {
    require_setup();
    let tmp = tmpdir("ensemble");
    let (a, b) = members(tmp.path());
    let out = tmp.path().join("ab");
    let r = runtime_cli(&["ensemble", s(&a.dir), s(&b.dir), "--out", s(&out)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let e = Bundle::load(&out).expect("ensemble loads");
    let (da, db) = (a.manifest.embedding_dim, b.manifest.embedding_dim);
    assert_eq!(e.manifest.embedding_dim, da + db);
    assert_eq!(e.manifest.name, "a-ensemble");
    assert_eq!(e.manifest.logit_scale, 30.0, "the members' mean");
    // Shared data set, split and validation rows carry over (runtime eval's default split).
    assert_eq!(e.manifest.provenance.dataset, "unifesp");
    assert_eq!(e.manifest.provenance.split, "reference");
    assert_eq!(e.manifest.provenance.training["val"], 0.1);
    assert_eq!(
        e.manifest.provenance.training["ensemble_members"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // The merged graph declares its output as [batch, da + db].
    let merged =
        ModelProto::decode(e.read_verified("image_encoder").unwrap().as_slice()).expect("onnx");
    let out_type = format!("{:?}", merged.graph.expect("graph").output[0].r#type);
    assert!(
        out_type.contains(&format!("DimValue({})", da + db)),
        "{out_type}"
    );

    let files: Vec<_> = ["gray_300x217.png", "rgb_640x480.jpg", "small_64x64.png"]
        .iter()
        .map(|f| fixtures().join("images").join(f))
        .collect();
    let (ea, eb, ee) = (
        image_embeddings(&a, &files),
        image_embeddings(&b, &files),
        image_embeddings(&e, &files),
    );
    let labels = a.manifest.labels.len();
    let mut largest_member_gap = 0f64;
    for ((x, y), z) in ea.iter().zip(&eb).zip(&ee) {
        // The image embedding: the members' unit embeddings over sqrt(2), side by side.
        let expected: Vec<f32> = unit(x)
            .into_iter()
            .chain(unit(y))
            .map(|v| v / 2f32.sqrt())
            .collect();
        let got = unit(z);
        assert!(max_abs_diff(&got, &expected) < 1e-5);
        for l in 0..labels {
            let ca = cosine(x, &a.label_embeddings[l * da..(l + 1) * da]);
            let cb = cosine(y, &b.label_embeddings[l * db..(l + 1) * db]);
            let ce = cosine(z, &e.label_embeddings[l * (da + db)..(l + 1) * (da + db)]);
            assert!(
                (ce - (ca + cb) / 2.0).abs() < 1e-5,
                "label {l}: {ce} vs {ca} and {cb}"
            );
            largest_member_gap = largest_member_gap.max((ca - cb).abs());
        }
    }
    assert!(
        largest_member_gap > 1e-2,
        "the members must differ for the test to mean anything ({largest_member_gap})"
    );

    // The merged text encoder gives the stored label embeddings (custom labels work).
    let mut engine = Engine::load(e.clone(), cpu()).expect("engine");
    let tokenizer =
        ClipTokenizer::from_bytes(&e.read_verified("tokenizer").unwrap(), Path::new("tok"))
            .unwrap();
    let prompts: Vec<String> = e
        .manifest
        .labels
        .iter()
        .map(|l| l.prompts[0].clone())
        .collect();
    let tokens = tokenizer.encode_batch(&prompts, Padding::Longest).unwrap();
    let (text, dim) = engine
        .text_encoder()
        .unwrap()
        .embed_tokens(&tokens)
        .unwrap();
    assert_eq!(dim, da + db);
    for l in 0..labels {
        let row = unit(&text[l * dim..(l + 1) * dim]);
        assert!(max_abs_diff(&row, &e.label_embeddings[l * dim..(l + 1) * dim]) < 1e-5);
    }

    // classify runs it, and its self-check passes.
    let info = runtime_cli(&["info", s(&out), "--check", "--device", "cpu"]);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let c = classify_json(&files[0], &["--model", s(&out)]);
    let logits: Vec<f64> = (0..labels)
        .map(|l| {
            30.0 * cosine(
                &ee[0],
                &e.label_embeddings[l * (da + db)..(l + 1) * (da + db)],
            )
        })
        .collect();
    let top = logits.iter().cloned().fold(f64::MIN, f64::max);
    let sum: f64 = logits.iter().map(|v| (v - top).exp()).sum();
    let p_top = c["top"][0]["probability"].as_f64().expect("probability");
    assert!((p_top - 1.0 / sum).abs() < 1e-4, "{p_top} vs {}", 1.0 / sum);

    // Nothing is replaced unasked.
    let again = runtime_cli(&["ensemble", s(&a.dir), s(&b.dir), "--out", s(&out)]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn members_that_do_not_answer_the_same_question_are_refused() {
    require_setup();
    let tmp = tmpdir("ensemble-refused");
    let (a, _) = members(tmp.path());
    let refused = |args: &[&str], why: &str| {
        let r = runtime_cli(args);
        let err = String::from_utf8_lossy(&r.stderr).to_string();
        assert!(!r.status.success(), "{args:?} was accepted");
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    let out = tmp.path().join("x");
    // One member only.
    refused(&["ensemble", s(&a.dir), "--out", s(&out)], "BUNDLE");
    // Other templates.
    let bare = tmp.path().join("bare");
    let r = runtime_cli(&[
        "prompts",
        "--model",
        s(&a.dir),
        "--labels",
        "unifesp",
        "--template",
        "{}",
        "--device",
        "cpu",
        "--out",
        s(&bare),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    refused(
        &["ensemble", s(&a.dir), s(&bare), "--out", s(&out)],
        "other templates",
    );
    // Other labels.
    let other = tmp.path().join("other");
    let r = runtime_cli(&[
        "prompts",
        "--model",
        s(&a.dir),
        "--labels",
        "chest,hand",
        "--device",
        "cpu",
        "--out",
        s(&other),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    refused(
        &["ensemble", s(&a.dir), s(&other), "--out", s(&out)],
        "other labels",
    );
    // A quantized member.
    let q = tmp.path().join("q");
    let r = runtime_cli(&["quantize", s(&a.dir), "--out", s(&q)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    refused(
        &["ensemble", s(&a.dir), s(&q), "--out", s(&out)],
        "quantize the ensemble",
    );
    // Not a bundle.
    refused(
        &["ensemble", s(&a.dir), s(tmp.path()), "--out", s(&out)],
        "manifest.json",
    );
    assert!(!out.exists(), "nothing written");
}
