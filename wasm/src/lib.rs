//! Browser bindings over `runtime` without its ONNX Runtime feature: the same decoding (PNG, JPEG,
//! DICOM), CLIP preprocessing, manifest checks and scoring as the native binaries.
//! The encoders themselves run in ONNX Runtime Web on the demo page (`wasm/www/`), tested in Chromium.

use std::path::Path;

use runtime::bundle::Manifest;
use runtime::image::decode::decode_bytes;
use runtime::image::preprocess::{normalize_into, resize_crop, PreprocessConfig};
use runtime::scoring;
use runtime::text::tokenizer::{ClipTokenizer, Padding};
use wasm_bindgen::prelude::*;

/// A decoded file: the model input and a preview of the picture as the model sees it.
#[wasm_bindgen]
pub struct Prepared {
    width: u32,
    height: u32,
    rgba: Vec<u8>,
    tensor: Vec<f32>,
}

#[wasm_bindgen]
impl Prepared {
    #[wasm_bindgen(getter)]
    pub fn width(&self) -> u32 {
        self.width
    }
    #[wasm_bindgen(getter)]
    pub fn height(&self) -> u32 {
        self.height
    }
    /// The picture the model sees (after DICOM windowing, resize and crop) as RGBA, for a canvas.
    pub fn rgba(&self) -> Vec<u8> {
        self.rgba.clone()
    }
    /// The normalised `[3, S, S]` model input.
    pub fn tensor(&self) -> Vec<f32> {
        self.tensor.clone()
    }
}

/// Decodes and preprocesses a file's bytes with a bundle manifest's settings (JSON text), or CLIP's
/// defaults when `manifest_json` is empty.
#[wasm_bindgen]
pub fn prepare(bytes: &[u8], file_name: &str, manifest_json: &str) -> Result<Prepared, JsError> {
    let cfg = if manifest_json.is_empty() {
        PreprocessConfig::default()
    } else {
        parse_manifest(manifest_json)?.preprocessing
    };
    let img =
        decode_bytes(bytes, Path::new(file_name)).map_err(|e| JsError::new(&e.to_string()))?;
    // The preview is the model's view: windowed, resized and cropped as the bundle says.
    let crop = resize_crop(&img, &cfg).map_err(|e| JsError::new(&format!("{file_name}: {e}")))?;
    let mut tensor = vec![0f32; cfg.tensor_len()];
    normalize_into(&crop, &cfg, &mut tensor);
    Ok(Prepared {
        width: crop.width,
        height: crop.height,
        rgba: crop.to_rgba(),
        tensor,
    })
}

/// Probabilities over labels for one image embedding (`labels`: rows of the label embeddings).
#[wasm_bindgen]
pub fn probabilities(
    image_embedding: &[f32],
    labels: &[f32],
    logit_scale: f32,
) -> Result<Vec<f32>, JsError> {
    if image_embedding.is_empty() || !labels.len().is_multiple_of(image_embedding.len()) {
        return Err(JsError::new(
            "label embeddings do not match the image embedding size",
        ));
    }
    Ok(scoring::probabilities(image_embedding, labels, logit_scale))
}

/// A bundle as the page holds it: the manifest and label embeddings, checked as the native loader
/// checks them (format, paths, label count vs embedding shape, sha256 of each file handed in).
#[wasm_bindgen]
pub struct DemoBundle {
    bundle: runtime::bundle::Bundle,
}

#[wasm_bindgen]
impl DemoBundle {
    #[wasm_bindgen(constructor)]
    pub fn new(manifest_json: &str, label_embeddings_npy: &[u8]) -> Result<DemoBundle, JsError> {
        let manifest = parse_manifest(manifest_json)?;
        let b = runtime::bundle::Bundle::from_label_embeddings(
            Path::new("bundle"),
            manifest,
            label_embeddings_npy,
        )
        .map_err(|e| JsError::new(&e.to_string()))?;
        Ok(DemoBundle { bundle: b })
    }

    /// The file of the class centroids of a calibrated bundle's "unknown" rule, when it has one
    /// (hand its bytes to [`DemoBundle::set_class_centroids`] before classifying).
    pub fn class_centroids_file(&self) -> Option<String> {
        self.bundle
            .manifest
            .files
            .get(runtime::bundle::CLASS_CENTROIDS)
            .map(|e| e.path.clone())
    }

    /// Takes the class centroids file (checked against the manifest: sha256, shape).
    pub fn set_class_centroids(&mut self, npy: &[u8]) -> Result<(), JsError> {
        self.bundle
            .set_class_centroids(npy)
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// The verdict of a calibrated bundle's "unknown" rule on one image (its embedding and the
    /// probabilities of [`DemoBundle::classify`]) as JSON: `{"unknown", "score", "below",
    /// "rule"}`, as `classify --json` decides it; empty without a rule.
    pub fn judge(&self, image_embedding: &[f32], probabilities: &[f32]) -> Result<String, JsError> {
        let Some(rule) = self.bundle.reject_rule() else {
            return Ok(String::new());
        };
        if rule.score == runtime::calibration::RejectScore::Centroid
            && self.bundle.class_centroids.is_none()
        {
            return Err(JsError::new(
                "the bundle's unknown rule needs its class centroids: set_class_centroids first",
            ));
        }
        let (unknown, score) = rule.judge(image_embedding, probabilities);
        Ok(serde_json::json!({
            "unknown": unknown,
            "score": score,
            "below": rule.below,
            "rule": rule.score.short_name(),
        })
        .to_string())
    }

    /// Checks a file of the bundle (e.g. `image_encoder`) against the manifest's size and sha256.
    pub fn verify(&self, role: &str, bytes: &[u8]) -> Result<(), JsError> {
        let entry = self
            .bundle
            .manifest
            .files
            .get(role)
            .ok_or_else(|| JsError::new(&format!("bundle has no {role}")))?;
        runtime::bundle::verify_bytes(Path::new("bundle"), &entry.path, entry, bytes)
            .map_err(|e| JsError::new(&e.to_string()))
    }

    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        self.bundle.manifest.name.clone()
    }

    #[wasm_bindgen(getter)]
    pub fn image_size(&self) -> u32 {
        self.bundle.manifest.preprocessing.image_size
    }

    /// File name, graph input and output of the image encoder, as JSON.
    pub fn image_encoder(&self) -> Result<String, JsError> {
        let e = self
            .bundle
            .manifest
            .files
            .get(runtime::bundle::IMAGE_ENCODER)
            .ok_or_else(|| JsError::new("bundle has no image encoder"))?;
        Ok(serde_json::json!({"path": e.path, "input": e.input, "output": e.output}).to_string())
    }

    pub fn has_text_encoder(&self) -> bool {
        self.bundle
            .manifest
            .files
            .contains_key(runtime::bundle::TEXT_ENCODER)
    }

    /// Label names, as JSON.
    pub fn labels(&self) -> String {
        serde_json::to_string(
            &self
                .bundle
                .manifest
                .labels
                .iter()
                .map(|l| l.label.name.clone())
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default()
    }

    #[wasm_bindgen(getter)]
    pub fn logit_scale(&self) -> f32 {
        self.bundle.manifest.logit_scale
    }

    /// The templates of the bundle's label embeddings, as JSON.
    pub fn templates(&self) -> String {
        serde_json::to_string(&self.bundle.manifest.templates).unwrap_or_default()
    }

    /// File name, graph input and output of the text encoder and the tokenizer's file, as JSON.
    pub fn text_encoder(&self) -> Result<String, JsError> {
        let f = &self.bundle.manifest.files;
        let (e, t) = f
            .get(runtime::bundle::TEXT_ENCODER)
            .zip(f.get(runtime::bundle::TOKENIZER))
            .ok_or_else(|| {
                JsError::new("this bundle has no text encoder: custom labels need one")
            })?;
        Ok(serde_json::json!({"path": e.path, "input": e.input, "output": e.output, "tokenizer": t.path}).to_string())
    }

    /// The self-check's file name, when the bundle has one (`models/README.md`, "The self-check").
    pub fn self_check_file(&self) -> Option<String> {
        self.bundle.manifest.self_check.as_ref()?;
        self.bundle
            .manifest
            .files
            .get(runtime::bundle::self_check::SELF_CHECK)
            .map(|e| e.path.clone())
    }

    /// The self-check's encoder inputs, `[count, 3, S, S]` flattened (empty without a self-check).
    pub fn self_check_inputs(&self) -> Result<Vec<f32>, JsError> {
        let Some(check) = &self.bundle.manifest.self_check else {
            return Ok(Vec::new());
        };
        let size = self.bundle.manifest.preprocessing.image_size as usize;
        runtime::bundle::self_check::check_inputs(check, size, Path::new("bundle"))
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// Compares the encoder's embeddings of the self-check inputs with the recorded ones (the
    /// bytes of the self-check file, verified first): the largest difference, or an error.
    pub fn self_check(&self, recorded_npy: &[u8], embeddings: &[f32]) -> Result<f32, JsError> {
        let check = self
            .bundle
            .manifest
            .self_check
            .as_ref()
            .ok_or_else(|| JsError::new("this bundle has no self-check"))?;
        self.verify(runtime::bundle::self_check::SELF_CHECK, recorded_npy)?;
        runtime::bundle::self_check::compare(
            check,
            self.bundle.manifest.embedding_dim,
            recorded_npy,
            embeddings,
            Path::new("bundle"),
            "onnxruntime-web (wasm)",
        )
        .map_err(|e| JsError::new(&e.to_string()))
    }

    /// Probabilities over the bundle's labels for one image embedding (with a calibrated
    /// bundle's temperature, as `classify`).
    pub fn classify(&self, image_embedding: &[f32]) -> Result<Vec<f32>, JsError> {
        probabilities(
            image_embedding,
            &self.bundle.label_embeddings,
            self.bundle.manifest.calibrated_logit_scale(),
        )
    }
}

/// Prompts of custom labels, tokenized with the bundle's tokenizer: every template filled with every
/// label (template-major), padded to the longest.
#[wasm_bindgen]
pub struct Prompts {
    ids: Vec<i64>,
    rows: usize,
    len: usize,
    labels: Vec<String>,
    templates: usize,
}

#[wasm_bindgen]
impl Prompts {
    #[wasm_bindgen(constructor)]
    pub fn new(
        tokenizer_json: &[u8],
        labels_text: &str,
        templates_json: &str,
    ) -> Result<Prompts, JsError> {
        let err = |e: runtime::Error| JsError::new(&e.to_string());
        let tokenizer =
            ClipTokenizer::from_bytes(tokenizer_json, Path::new("tokenizer.json")).map_err(err)?;
        let labels =
            runtime::text::labels::from_list(labels_text.split([',', '\n'])).map_err(err)?;
        let templates: Vec<String> = serde_json::from_str(templates_json)
            .map_err(|e| JsError::new(&format!("templates: {e}")))?;
        let texts = runtime::text::prompts::prompts(&templates, &labels).map_err(err)?;
        let batch = tokenizer
            .encode_batch(&texts, Padding::Longest)
            .map_err(err)?;
        Ok(Prompts {
            ids: batch.ids,
            rows: batch.batch,
            len: batch.len,
            labels: labels.into_iter().map(|l| l.name).collect(),
            templates: templates.len(),
        })
    }

    /// Token ids, row-major `[rows, len]` (a BigInt64Array in JS).
    pub fn ids(&self) -> Vec<i64> {
        self.ids.clone()
    }
    #[wasm_bindgen(getter)]
    pub fn rows(&self) -> usize {
        self.rows
    }
    #[wasm_bindgen(getter)]
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
    /// Label names, as JSON.
    pub fn labels(&self) -> String {
        serde_json::to_string(&self.labels).unwrap_or_default()
    }

    /// Label embeddings from the text encoder's output for these prompts (`[rows, dim]`): templates
    /// averaged after normalising, as native `classify --labels`.
    pub fn label_embeddings(&self, text_embeddings: &[f32]) -> Result<Vec<f32>, JsError> {
        if self.rows == 0 || !text_embeddings.len().is_multiple_of(self.rows) {
            return Err(JsError::new("text embeddings do not match the prompts"));
        }
        let dim = text_embeddings.len() / self.rows;
        let per_label = self.labels.len() * dim;
        let per_template: Vec<Vec<f32>> = text_embeddings
            .chunks(per_label)
            .take(self.templates)
            .map(<[f32]>::to_vec)
            .collect();
        Ok(scoring::ensemble(&per_template, dim))
    }
}

fn parse_manifest(json: &str) -> Result<Manifest, JsError> {
    let m: Manifest =
        serde_json::from_str(json).map_err(|e| JsError::new(&format!("manifest.json: {e}")))?;
    m.validate(Path::new("bundle"))
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(m)
}
