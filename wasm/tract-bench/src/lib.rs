//! Scratch benchmark: the same image encoder run by tract inside the wasm module.
use tract_onnx::prelude::*;
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
pub struct TractEncoder {
    model: std::sync::Arc<TypedRunnableModel>,
    size: usize,
}

#[wasm_bindgen]
impl TractEncoder {
    #[wasm_bindgen(constructor)]
    pub fn new(onnx: &[u8], size: usize) -> Result<TractEncoder, JsError> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(onnx))
            .and_then(|m| m.with_input_fact(0, f32::fact([1, 3, size, size]).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| JsError::new(&e.to_string()))?;
        Ok(TractEncoder { model, size })
    }

    pub fn embed(&self, pixels: Vec<f32>) -> Result<Vec<f32>, JsError> {
        let s = self.size;
        let input = tract_ndarray::Array4::from_shape_vec((1, 3, s, s), pixels).map_err(|e| JsError::new(&e.to_string()))?;
        let out = self.model.run(tvec!(Tensor::from(input).into())).map_err(|e| JsError::new(&e.to_string()))?;
        let v = out[0].to_plain_array_view::<f32>().map_err(|e| JsError::new(&e.to_string()))?;
        Ok(v.iter().copied().collect())
    }
}
