//! `runtime import`: CLIP exported to ONNX as users have it -> a bundle.
//!
//! Layouts, recognised by their files:
//! - transformers.js (`onnx/vision_model.onnx`, `onnx/text_model.onnx`, `*_quantized.onnx` with
//!   `--quantized`; `tokenizer.json` and `preprocessor_config.json` at the top);
//! - HF optimum's single `model.onnx` with both towers (inputs `input_ids`, `pixel_values`,
//!   `attention_mask`; outputs `image_embeds`, `text_embeds`, logits): split here into the two
//!   encoders, and its `logit_scale` read from the graph;
//! - two encoders side by side (`vision_model.onnx` / `image_encoder.onnx` and `text_model.onnx` /
//!   `text_encoder.onnx`), as a `torch.onnx` script writes them.
//!
//! Preprocessing comes from `preprocessor_config.json` (HF `CLIPImageProcessor`) when there is one.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::onnx_proto::{ModelProto, TensorProto};
use prost::Message;

use crate::bundle::assemble::{assemble_from, AssembleInput, AssembleSpec};
use crate::bundle::{Bundle, Provenance};
use crate::engine::EngineOptions;
use crate::error::{Error, Result};
use crate::image::preprocess::{Crop, PreprocessConfig};
use crate::text::labels::Label;

/// What the user asked for besides the export folder.
pub struct ImportOptions {
    pub labels: Vec<Label>,
    pub templates: Vec<String>,
    /// exp(logit scale); `None`: read from the graph where it is, else 100 (OpenAI's CLIP).
    pub logit_scale: Option<f32>,
    /// transformers.js: take the `_quantized` encoders.
    pub quantized: bool,
    pub name: String,
}

/// How the export folder was read, for the command's report.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub layout: &'static str,
    pub image_encoder: String,
    pub text_encoder: String,
    pub logit_scale_from: String,
    pub preprocessing_from: String,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Decode {
        path: path.to_path_buf(),
        format: "ONNX",
        reason: reason.into(),
    }
}

/// Imports the export in `dir` as the bundle folder `out`.
pub fn import(
    dir: &Path,
    opts: ImportOptions,
    out: &Path,
    force: bool,
    engine: &EngineOptions,
) -> Result<(Bundle, Found)> {
    if !dir.is_dir() {
        return Err(Error::Import(format!(
            "{}: not a folder (give the folder of the export)",
            dir.display()
        )));
    }
    let first = |names: &[&str]| names.iter().map(|n| dir.join(n)).find(|p| p.is_file());
    let suffix = if opts.quantized { "_quantized" } else { "" };
    let js_vision = dir.join(format!("onnx/vision_model{suffix}.onnx"));
    let js_text = dir.join(format!("onnx/text_model{suffix}.onnx"));
    let combined = first(&["model.onnx", "onnx/model.onnx"]);
    let (layout, image, text) = if js_vision.is_file() && js_text.is_file() {
        let image = (read(&js_vision)?, js_vision.display().to_string());
        let text = (read(&js_text)?, js_text.display().to_string());
        ("transformers.js", image, text)
    } else if let (Some(v), Some(t)) = (
        first(&["vision_model.onnx", "image_encoder.onnx"]),
        first(&["text_model.onnx", "text_encoder.onnx"]),
    ) {
        let image = (read(&v)?, v.display().to_string());
        let text = (read(&t)?, t.display().to_string());
        ("separate encoders", image, text)
    } else if let Some(m) = &combined {
        let model = decode(m)?;
        let image = extract(&model, m, "pixel_values", "image_embeds")?;
        let text = extract(&model, m, "input_ids", "text_embeds")?;
        (
            "optimum (one model.onnx)",
            (image, format!("{} (image tower)", m.display())),
            (text, format!("{} (text tower)", m.display())),
        )
    } else {
        return Err(Error::Import(format!(
            "{}: no CLIP export found (looked for onnx/vision_model{suffix}.onnx + onnx/text_model{suffix}.onnx, vision_model.onnx + text_model.onnx, model.onnx)",
            dir.display()
        )));
    };

    // The logit scale: asked for, else the graph's `logit_scale` parameter where a graph holds it.
    let (logit_scale, logit_scale_from) = match (opts.logit_scale, &combined) {
        (Some(s), _) => (s, "--logit-scale".to_string()),
        (None, Some(m)) => match logit_scale_of(&decode(m)?) {
            Some(s) => (s, format!("{} (logit_scale)", m.display())),
            None => (100.0, "default 100 (OpenAI's CLIP)".to_string()),
        },
        (None, None) => (
            100.0,
            "default 100 (OpenAI's CLIP; no graph with logit_scale; --logit-scale to change)"
                .to_string(),
        ),
    };
    let pre_path = dir.join("preprocessor_config.json");
    let (preprocessing, preprocessing_from) = if pre_path.is_file() {
        (
            preprocessing_of(&read(&pre_path)?, &pre_path)?,
            pre_path.display().to_string(),
        )
    } else {
        (
            PreprocessConfig::default(),
            "CLIP's defaults (no preprocessor_config.json)".to_string(),
        )
    };
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() {
        Some((read(&tok_path)?, tok_path.clone()))
    } else {
        None
    };
    let found = Found {
        layout,
        image_encoder: image.1.clone(),
        text_encoder: text.1.clone(),
        logit_scale_from,
        preprocessing_from,
    };
    let spec = AssembleSpec {
        name: opts.name,
        description: format!("imported from {} ({layout})", dir.display()),
        image_encoder: PathBuf::new(),
        text_encoder: None,
        tokenizer: None,
        labels: opts.labels,
        templates: opts.templates,
        label_embeddings: None,
        logit_scale,
        preprocessing,
        provenance: Provenance {
            base_weights: format!("{} ({layout})", dir.display()),
            ..Default::default()
        },
    };
    let input = AssembleInput {
        image_encoder: image,
        text_encoder: Some(text),
        tokenizer,
    };
    let bundle = assemble_from(spec, input, out, force, engine)?;
    Ok((bundle, found))
}

fn decode(path: &Path) -> Result<ModelProto> {
    let model = ModelProto::decode(read(path)?.as_slice())
        .map_err(|e| bad(path, format!("not an ONNX model: {e}")))?;
    let graph = model.graph.as_ref().ok_or_else(|| bad(path, "no graph"))?;
    if graph
        .initializer
        .iter()
        .any(|t| !t.external_data.is_empty())
    {
        return Err(bad(
            path,
            "weights in external data files are not supported (export as one file)",
        ));
    }
    Ok(model)
}

/// The part of `model` that computes `output` from `input` (and `attention_mask` where the text
/// tower uses it): the nodes it depends on, their initializers, that input alone.
pub fn extract(model: &ModelProto, path: &Path, input: &str, output: &str) -> Result<Vec<u8>> {
    let graph = model.graph.as_ref().ok_or_else(|| bad(path, "no graph"))?;
    if !graph.output.iter().any(|o| o.name == output) {
        return Err(bad(path, format!("the graph has no output {output:?}")));
    }
    if graph.node.iter().any(|n| {
        n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
    }) {
        return Err(bad(
            path,
            "graphs with sub-graphs (If, Loop) cannot be split",
        ));
    }
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut needed_nodes = HashSet::new();
    let mut needed = HashSet::new();
    let mut stack = vec![output];
    while let Some(t) = stack.pop() {
        if !needed.insert(t) {
            continue;
        }
        if let Some(&i) = producer.get(t) {
            if needed_nodes.insert(i) {
                stack.extend(
                    graph.node[i]
                        .input
                        .iter()
                        .map(String::as_str)
                        .filter(|s| !s.is_empty()),
                );
            }
        }
    }
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| needed.contains(i.name.as_str()) && !initializers.contains(i.name.as_str()))
        .cloned()
        .collect();
    let extra: Vec<&str> = inputs
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| *n != input && *n != "attention_mask")
        .collect();
    if !inputs.iter().any(|i| i.name == input) || !extra.is_empty() {
        return Err(bad(
            path,
            format!("{output} does not depend on {input} alone (it needs {extra:?})"),
        ));
    }
    let mut part = model.clone();
    let g = part.graph.as_mut().expect("checked above");
    g.node = graph
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| needed_nodes.contains(i))
        .map(|(_, n)| n.clone())
        .collect();
    g.initializer = graph
        .initializer
        .iter()
        .filter(|t| needed.contains(t.name.as_str()))
        .cloned()
        .collect();
    g.input = inputs;
    g.output = graph
        .output
        .iter()
        .filter(|o| o.name == output)
        .cloned()
        .collect();
    g.value_info.retain(|v| needed.contains(v.name.as_str()));
    Ok(part.encode_to_vec())
}

/// exp of the graph's scalar `logit_scale` initializer (HF and OpenAI CLIP keep the log).
pub fn logit_scale_of(model: &ModelProto) -> Option<f32> {
    let t: &TensorProto = model
        .graph
        .as_ref()?
        .initializer
        .iter()
        .find(|t| t.name == "logit_scale" || t.name.ends_with(".logit_scale"))?;
    const FLOAT: i32 = 1;
    if t.data_type != FLOAT || t.dims.iter().product::<i64>() != 1 {
        return None;
    }
    let v = match (t.float_data.first(), t.raw_data.as_slice()) {
        (Some(v), _) => *v,
        (None, [a, b, c, d]) => f32::from_le_bytes([*a, *b, *c, *d]),
        _ => return None,
    };
    Some(v.exp()).filter(|s| s.is_finite() && *s > 0.0)
}

/// Our preprocessing from HF's `preprocessor_config.json` (`CLIPImageProcessor`): resize of the
/// shorter side and centre crop (or a square `size` without the crop), mean and std; anything
/// else is refused rather than guessed.
pub fn preprocessing_of(bytes: &[u8], path: &Path) -> Result<PreprocessConfig> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|cause| Error::Json {
        path: path.to_path_buf(),
        cause,
    })?;
    let refuse = |what: String| {
        Error::Import(format!(
            "{}: {what}; only CLIP's resize-shorter-side + centre-crop preprocessing (or a square size without a crop) is supported",
            path.display()
        ))
    };
    let side = |key: &str, inner: &[&str]| -> Option<u32> {
        let x = &v[key];
        x.as_u64()
            .or_else(|| inner.iter().find_map(|k| x[*k].as_u64()))
            .and_then(|n| u32::try_from(n).ok())
    };
    // `size: {height, width}` without the centre crop: the whole image resized to the square.
    let square = |key: &str| v["size"][key].as_u64().and_then(|n| u32::try_from(n).ok());
    let whole = match (square("height"), square("width")) {
        (Some(h), Some(w)) if v["size"]["shortest_edge"].is_null() => {
            if h != w {
                return Err(refuse(format!("size {w}x{h} is not square")));
            }
            if v["do_center_crop"] != false {
                return Err(refuse("a fixed size followed by a centre crop".into()));
            }
            Some(w)
        }
        _ => None,
    };
    let (shortest, w, crop) = match whole {
        Some(w) => (w, w, Crop::None),
        None => {
            let shortest = side("size", &["shortest_edge"])
                .ok_or_else(|| refuse("no size.shortest_edge".into()))?;
            let (h, w) = (
                side("crop_size", &["height"]).unwrap_or(shortest),
                side("crop_size", &["width"]).unwrap_or(shortest),
            );
            if h != w {
                return Err(refuse(format!("crop {w}x{h} is not square")));
            }
            if v["do_center_crop"] == false {
                return Err(refuse("crop switched off".into()));
            }
            (shortest, w, Crop::Center)
        }
    };
    if v["do_resize"] == false || v["do_normalize"] == false {
        return Err(refuse("resize or normalisation switched off".into()));
    }
    if !(v["resample"].is_null() || v["resample"] == 3) {
        return Err(refuse(format!(
            "resample {} is not bicubic (3)",
            v["resample"]
        )));
    }
    if let Some(f) = v["rescale_factor"].as_f64() {
        if (f - 1.0 / 255.0).abs() > 1e-9 {
            return Err(refuse(format!("rescale factor {f} is not 1/255")));
        }
    }
    let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
        match v[key].as_array() {
            None => Ok(default),
            Some(a) if a.len() == 3 => {
                let mut out = [0f32; 3];
                for (o, x) in out.iter_mut().zip(a) {
                    *o = x
                        .as_f64()
                        .ok_or_else(|| refuse(format!("{key} is not numbers")))?
                        as f32;
                }
                Ok(out)
            }
            Some(_) => Err(refuse(format!("{key} has not 3 values"))),
        }
    };
    let cfg = PreprocessConfig {
        image_size: w,
        resize_shortest_edge: shortest,
        crop,
        mean: triple("image_mean", crate::image::preprocess::CLIP_MEAN)?,
        std: triple("image_std", crate::image::preprocess::CLIP_STD)?,
        ..PreprocessConfig::default()
    };
    cfg.validate().map_err(refuse)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_preprocessor_configs() {
        let p = Path::new("preprocessor_config.json");
        let cfg = preprocessing_of(
            br#"{"size": {"shortest_edge": 112}, "crop_size": {"height": 112, "width": 112}, "resample": 3,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}"#,
            p,
        )
        .unwrap();
        assert_eq!((cfg.image_size, cfg.resize_shortest_edge), (112, 112));
        assert_eq!(cfg.mean, [0.5; 3]);
        // Older files: plain numbers.
        let cfg = preprocessing_of(br#"{"size": 224, "crop_size": 224}"#, p).unwrap();
        assert_eq!(cfg, PreprocessConfig::default());
        assert!(preprocessing_of(br#"{"size": 224, "resample": 2}"#, p).is_err());
        assert!(preprocessing_of(br#"{"size": 224, "do_center_crop": false}"#, p).is_err());
        // A square size without the crop: the whole image; written back the same way.
        let whole = preprocessing_of(
            br#"{"size": {"height": 96, "width": 96}, "do_center_crop": false}"#,
            p,
        )
        .unwrap();
        assert_eq!((whole.image_size, whole.crop), (96, Crop::None));
        let hf = crate::bundle::write::hf_preprocessor_config(&whole);
        assert_eq!(
            preprocessing_of(hf.to_string().as_bytes(), p).unwrap(),
            whole
        );
        let centre = crate::bundle::write::hf_preprocessor_config(&PreprocessConfig::default());
        assert_eq!(
            preprocessing_of(centre.to_string().as_bytes(), p).unwrap(),
            PreprocessConfig::default()
        );
        assert!(preprocessing_of(
            br#"{"size": {"height": 96, "width": 80}, "do_center_crop": false}"#,
            p
        )
        .is_err());
        assert!(preprocessing_of(br#"{"size": {"height": 96, "width": 96}}"#, p).is_err());
        assert!(preprocessing_of(br#"{"crop_size": 224}"#, p).is_err());
    }
}
