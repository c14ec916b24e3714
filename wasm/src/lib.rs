//! Browser bindings over `runtime` without its ONNX Runtime feature: the same decoding (PNG, JPEG,
//! DICOM), CLIP preprocessing, manifest checks and scoring as the native binaries.
//! The in-browser model execution and the demo page are tracked separately.

use std::path::Path;

use runtime::bundle::Manifest;
use runtime::decode::decode_bytes;
use runtime::preprocess::{preprocess, PreprocessConfig};
use runtime::scoring;
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
    /// The decoded picture (after DICOM windowing) as RGBA, for a canvas.
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
    Ok(Prepared {
        width: img.width,
        height: img.height,
        rgba: img.to_rgba(),
        tensor: preprocess(&img, &cfg),
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

fn parse_manifest(json: &str) -> Result<Manifest, JsError> {
    let m: Manifest =
        serde_json::from_str(json).map_err(|e| JsError::new(&format!("manifest.json: {e}")))?;
    m.validate(Path::new("bundle"))
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_matches_the_native_pipeline() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/images/small_64x64.png");
        let bytes = std::fs::read(&path).unwrap();
        let p = prepare(&bytes, "small.png", "").unwrap();
        assert_eq!((p.width(), p.height()), (64, 64));
        assert_eq!(p.rgba().len(), 64 * 64 * 4);
        let native = preprocess(
            &runtime::decode::decode_file(&path).unwrap(),
            &PreprocessConfig::default(),
        );
        assert_eq!(p.tensor(), native);
    }
}
