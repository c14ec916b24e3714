//! ONNX Runtime inference (feature `onnx`): the bundle's image and text encoders on CPU or CUDA.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

use crate::bundle::{self, Bundle, FileEntry};
use crate::error::{Error, Result};
use crate::text::tokenizer::TokenBatch;

/// Where the encoders run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Device {
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// ONNX Runtime's CUDA provider (an error when it cannot start).
    Cuda,
    /// CUDA when it is available, else CPU (with a one-line notice on stderr).
    #[default]
    Auto,
}

impl Device {
    /// The option value (`cpu`, `cuda`, `auto`), for messages.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub device: Device,
    /// Intra-op threads; 0 lets ONNX Runtime choose (one per core).
    pub threads: usize,
}

/// Where the ONNX Runtime shared library is looked for: `ORT_DYLIB_PATH`, then the copy that
/// `scripts/setup.sh` installs.
pub fn onnxruntime_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(p));
    }
    let candidate = crate::cache_dir()
        .join("onnxruntime")
        .join("libonnxruntime.so");
    if candidate.exists() {
        return Ok(candidate);
    }
    Err(Error::Inference {
        context: "ONNX Runtime".into(),
        reason: format!(
            "shared library not found (looked at ORT_DYLIB_PATH and {}); run scripts/setup.sh",
            candidate.display()
        ),
    })
}

fn ort_err(context: impl Into<String>) -> impl FnOnce(ort::Error) -> Error {
    let context = context.into();
    move |cause| Error::Ort { context, cause }
}

fn environment() -> Result<&'static ort::environment::Environment> {
    static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> =
        OnceLock::new();
    ENV.get_or_init(|| {
        let lib = onnxruntime_library().map_err(|e| e.to_string())?;
        let builder =
            ort::init_from(&lib).map_err(|e| format!("loading {}: {e}", lib.display()))?;
        builder
            .with_name("xray-clip")
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|reason| Error::Inference {
        context: "ONNX Runtime".into(),
        reason: reason.clone(),
    })
}

const ATTENTION_MASK: &str = "attention_mask";
/// Tensor names CLIP exports use (HF transformers, optimum, this project's trainer).
const PREFERRED_NAMES: [&str; 4] = ["pixel_values", "input_ids", "image_embeds", "text_embeds"];
/// CLIP's end-of-text token: everything after the first one in a row is padding.
const END_OF_TEXT: i64 = 49_407;

/// 1 up to and including each row's first end-of-text token, 0 after it (all 1 without one).
fn attention_mask(ids: &[i64], len: usize) -> Vec<i64> {
    let mut mask = vec![1i64; ids.len()];
    for (row, m) in ids.chunks(len.max(1)).zip(mask.chunks_mut(len.max(1))) {
        if let Some(end) = row.iter().position(|&t| t == END_OF_TEXT) {
            m[end + 1..].fill(0);
        }
    }
    mask
}

/// Whether the graph dequantizes stored weights only (the int8 convolutions of
/// `bundle::quantize`), no activations. ONNX Runtime then may fold those `DequantizeLinear`s into
/// float weights at load (`session.disable_quant_qdq`), which its QDQ handling otherwise prevents:
/// an int8 ResNet tower ran 1.7 times slower than fp32 without the folding, as fast with it
/// (rn-small, batch 16: 6.5 / 3.7 / 3.9 ms per image). A graph with activation Q/DQ pairs (a
/// Python `quantize_static` QDQ model) keeps ORT's QDQ fusion.
fn weight_only_dequantize(bytes: &[u8]) -> bool {
    use prost::Message;
    if memchr::memmem::find(bytes, b"DequantizeLinear").is_none() {
        return false;
    }
    let Some(graph) = crate::onnx_proto::ModelProto::decode(bytes)
        .ok()
        .and_then(|m| m.graph)
    else {
        return false;
    };
    let stored: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .node
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .all(|n| n.input.first().is_some_and(|i| stored.contains(i.as_str())))
}

/// One ONNX graph with one input and one output of interest.
pub struct Encoder {
    session: Session,
    input: String,
    output: String,
    /// The graph also takes `attention_mask` (HF `torch.onnx` and optimum text encoders).
    attention_mask: bool,
    /// Which device it ended up on.
    pub device: Device,
}

impl Encoder {
    /// Builds a session from verified model bytes.
    pub fn from_bytes(
        bytes: &[u8],
        what: &str,
        opts: &EngineOptions,
        names: (Option<&str>, Option<&str>),
    ) -> Result<Encoder> {
        let env = environment()?;
        // Decided once: `build` may run twice (CUDA, then CPU).
        let fold_dequantized_weights = weight_only_dequantize(bytes);
        let build = |cuda: bool| -> Result<Session> {
            let session = || -> ort::Result<Session> {
                let mut b = Session::builder(env)?
                    .with_optimization_level(GraphOptimizationLevel::All)?
                    .with_intra_op_spinning(false)?
                    .with_inter_op_spinning(false)?;
                if opts.threads > 0 {
                    b = b.with_intra_threads(opts.threads)?;
                }
                if fold_dequantized_weights {
                    b = b.with_config_entry("session.disable_quant_qdq", "1")?;
                }
                if cuda {
                    b = with_cuda(b)?;
                }
                b.commit_from_memory(bytes)
            };
            session().map_err(ort_err(what))
        };
        let (session, device) = match opts.device {
            Device::Cpu => (build(false)?, Device::Cpu),
            Device::Cuda => (build(true)?, Device::Cuda),
            Device::Auto => match build(true) {
                Ok(s) => (s, Device::Cuda),
                Err(e) => {
                    if cfg!(feature = "cuda") {
                        eprintln!("notice: CUDA is not available ({e}); running on CPU");
                    }
                    (build(false)?, Device::Cpu)
                }
            },
        };
        let pick = |wanted: Option<&str>, have: Vec<String>, kind: &str| -> Result<String> {
            match wanted {
                Some(w) if have.iter().any(|h| h == w) => Ok(w.to_string()),
                Some(w) => Err(Error::Inference {
                    context: what.to_string(),
                    reason: format!(
                        "graph has no {kind} named {w:?} (it has {})",
                        have.join(", ")
                    ),
                }),
                // Without a name: the tensor CLIP exports call it, else the first.
                None => have
                    .iter()
                    .find(|h| PREFERRED_NAMES.contains(&h.as_str()))
                    .or(have.first())
                    .cloned()
                    .ok_or_else(|| Error::Inference {
                        context: what.to_string(),
                        reason: format!("graph has no {kind}"),
                    }),
            }
        };
        let inputs: Vec<String> = session
            .inputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let outputs = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let attention_mask = inputs.iter().any(|i| i == ATTENTION_MASK);
        let input = pick(names.0, inputs.clone(), "input")?;
        let output = pick(names.1, outputs, "output")?;
        let others: Vec<&String> = inputs
            .iter()
            .filter(|i| **i != input && i.as_str() != ATTENTION_MASK)
            .collect();
        if !others.is_empty() {
            return Err(Error::Inference {
                context: what.to_string(),
                reason: format!(
                    "graph needs inputs {} besides {input:?}; give one encoder per graph (vision and text exported separately)",
                    others.iter().map(|o| o.as_str()).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        Ok(Encoder {
            session,
            input,
            output,
            attention_mask,
            device,
        })
    }

    fn from_entry(bundle: &Bundle, role: &str, opts: &EngineOptions) -> Result<Encoder> {
        let entry: &FileEntry = &bundle.manifest.files[role];
        let bytes = bundle.read_verified(role)?;
        let what = format!("{} ({role})", bundle.dir.join(&entry.path).display());
        Encoder::from_bytes(
            &bytes,
            &what,
            opts,
            (entry.input.as_deref(), entry.output.as_deref()),
        )
    }

    /// Runs a float input of `shape`; returns `[rows, dim]` row-major and `dim`.
    fn run_f32(&mut self, shape: &[usize], data: &[f32]) -> Result<(Vec<f32>, usize)> {
        let t =
            TensorRef::from_array_view((shape.to_vec(), data)).map_err(ort_err("input tensor"))?;
        let input = self.input.clone();
        self.run(ort::inputs![input.as_str() => t], shape[0])
    }

    fn run_i64(&mut self, shape: &[usize], data: &[i64]) -> Result<(Vec<f32>, usize)> {
        let t =
            TensorRef::from_array_view((shape.to_vec(), data)).map_err(ort_err("input tensor"))?;
        let input = self.input.clone();
        if !self.attention_mask {
            return self.run(ort::inputs![input.as_str() => t], shape[0]);
        }
        let mask = attention_mask(data, shape[1]);
        let m = TensorRef::from_array_view((shape.to_vec(), mask.as_slice()))
            .map_err(ort_err("attention mask"))?;
        self.run(
            ort::inputs![input.as_str() => t, ATTENTION_MASK => m],
            shape[0],
        )
    }

    fn run(
        &mut self,
        inputs: Vec<(
            std::borrow::Cow<'_, str>,
            ort::session::SessionInputValue<'_>,
        )>,
        rows: usize,
    ) -> Result<(Vec<f32>, usize)> {
        let output = self.output.clone();
        let outputs = self
            .session
            .run(inputs)
            .map_err(ort_err(format!("running graph (output {output})")))?;
        let (shape, values) = outputs[output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(ort_err("reading output"))?;
        if shape.len() != 2 || shape[0] as usize != rows {
            return Err(Error::Shape {
                what: format!("output {output}"),
                expected: format!("[{rows}, D]"),
                actual: format!("{:?}", &shape[..]),
            });
        }
        Ok((values.to_vec(), shape[1] as usize))
    }
}

#[cfg(feature = "cuda")]
fn with_cuda(
    b: ort::session::builder::SessionBuilder,
) -> std::result::Result<ort::session::builder::SessionBuilder, ort::Error> {
    b.with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
        .map_err(Into::into)
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _: ort::session::builder::SessionBuilder,
) -> std::result::Result<ort::session::builder::SessionBuilder, ort::Error> {
    Err(ort::Error::new(
        "this build has no CUDA support (build with --features cuda)",
    ))
}

/// The encoders of a bundle.
pub struct Engine {
    pub bundle: Bundle,
    image: Encoder,
    text: Option<Encoder>,
    options: EngineOptions,
}

impl Engine {
    pub fn load(bundle: Bundle, options: EngineOptions) -> Result<Engine> {
        let image = Encoder::from_entry(&bundle, bundle::IMAGE_ENCODER, &options)?;
        Ok(Engine {
            bundle,
            image,
            text: None,
            options,
        })
    }

    pub fn device(&self) -> Device {
        self.image.device
    }

    /// Image embeddings of a batch of preprocessed images (`[batch, 3, S, S]` flattened), not normalised.
    pub fn embed_images(&mut self, pixels: &[f32], batch: usize) -> Result<Vec<f32>> {
        let s = self.bundle.manifest.preprocessing.image_size as usize;
        let (out, dim) = self.image.run_f32(&[batch, 3, s, s], pixels)?;
        self.check_dim(dim, "image encoder")?;
        Ok(out)
    }

    /// Text embeddings of a token batch, not normalised. Loads the text encoder on first use.
    pub fn embed_texts(&mut self, tokens: &TokenBatch) -> Result<Vec<f32>> {
        self.text_encoder()?;
        let enc = self.text.as_mut().expect("loaded above");
        let (out, dim) = enc.embed_tokens(tokens)?;
        self.check_dim(dim, "text encoder")?;
        Ok(out)
    }

    /// The text encoder, loaded on first use.
    pub fn text_encoder(&mut self) -> Result<&mut Encoder> {
        if self.text.is_none() {
            if !self.bundle.has_text_encoder() {
                return Err(Error::bundle(
                    &self.bundle.dir,
                    "has no text encoder, so it cannot score custom labels or templates",
                ));
            }
            self.text = Some(Encoder::from_entry(
                &self.bundle,
                bundle::TEXT_ENCODER,
                &self.options,
            )?);
        }
        Ok(self.text.as_mut().expect("loaded above"))
    }

    /// Runs the bundle's self-check on this engine's device: `Ok(None)` for a bundle without one,
    /// `Ok(Some(largest difference))` when the embeddings written with the bundle are reproduced,
    /// an error saying by how much they are not.
    pub fn self_check(&mut self) -> Result<Option<f32>> {
        use crate::bundle::self_check::{self, SELF_CHECK};
        let Some(check) = self.bundle.manifest.self_check.clone() else {
            return Ok(None);
        };
        let dir = self.bundle.dir.clone();
        let size = self.bundle.manifest.preprocessing.image_size as usize;
        let inputs = self_check::check_inputs(&check, size, &dir)?;
        let recorded = self.bundle.read_verified(SELF_CHECK)?;
        let got = self.embed_images(&inputs, check.count)?;
        let dim = self.bundle.manifest.embedding_dim;
        let device = self.device().name();
        self_check::compare(&check, dim, &recorded, &got, &dir, device).map(Some)
    }

    fn check_dim(&self, dim: usize, what: &str) -> Result<()> {
        if dim != self.bundle.manifest.embedding_dim {
            return Err(Error::Shape {
                what: what.to_string(),
                expected: format!("embedding size {}", self.bundle.manifest.embedding_dim),
                actual: dim.to_string(),
            });
        }
        Ok(())
    }
}

/// Loads an encoder straight from an ONNX file (benchmarks, parity checks).
pub fn encoder_from_file(path: &Path, opts: &EngineOptions) -> Result<Encoder> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Encoder::from_bytes(&bytes, &path.display().to_string(), opts, (None, None))
}

impl Encoder {
    pub fn input_name(&self) -> &str {
        &self.input
    }

    pub fn output_name(&self) -> &str {
        &self.output
    }

    /// Runs an image encoder on `[batch, 3, S, S]` pixels; returns `[batch, dim]` row-major and `dim`.
    pub fn embed_pixels(&mut self, shape: &[usize], data: &[f32]) -> Result<(Vec<f32>, usize)> {
        self.run_f32(shape, data)
    }

    /// Runs a float input and returns the smallest and largest value of each named tensor: a graph
    /// output (see `bundle::quantize::with_outputs`) or the input itself.
    pub fn output_ranges(
        &mut self,
        shape: &[usize],
        data: &[f32],
        names: &[String],
    ) -> Result<Vec<(f32, f32)>> {
        let range = |v: &[f32]| {
            v.iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                })
        };
        let t =
            TensorRef::from_array_view((shape.to_vec(), data)).map_err(ort_err("input tensor"))?;
        let input = self.input.clone();
        let outputs = self
            .session
            .run(ort::inputs![input.as_str() => t])
            .map_err(ort_err("running graph"))?;
        names
            .iter()
            .map(|name| {
                if *name == input {
                    return Ok(range(data));
                }
                let value = outputs.get(name.as_str()).ok_or_else(|| Error::Inference {
                    context: "calibration".into(),
                    reason: format!("the graph has no output {name}"),
                })?;
                let (_, values) = value
                    .try_extract_tensor::<f32>()
                    .map_err(ort_err(format!("reading {name}")))?;
                Ok(range(values))
            })
            .collect()
    }

    /// Runs a text encoder on a token batch; returns `[batch, dim]` row-major and `dim`.
    pub fn embed_tokens(&mut self, tokens: &TokenBatch) -> Result<(Vec<f32>, usize)> {
        self.run_i64(&[tokens.batch, tokens.len], &tokens.ids)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_weight_dequantization_turns_the_qdq_handling_off() {
        use crate::onnx_proto::{GraphProto, ModelProto, NodeProto, TensorProto};
        use prost::Message;
        let model = |dq_input: &str| {
            ModelProto {
                graph: Some(GraphProto {
                    initializer: vec![TensorProto {
                        name: "w_int8".into(),
                        ..Default::default()
                    }],
                    node: vec![NodeProto {
                        op_type: "DequantizeLinear".into(),
                        input: vec![dq_input.into(), "s".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        assert!(super::weight_only_dequantize(&model("w_int8")));
        assert!(!super::weight_only_dequantize(&model("activation")));
        assert!(!super::weight_only_dequantize(
            &ModelProto::default().encode_to_vec()
        ));
    }

    #[test]
    fn attention_mask_ends_at_end_of_text() {
        let ids = [49406, 320, 49407, 0, 49406, 49407, 49407, 49407];
        assert_eq!(super::attention_mask(&ids, 4), vec![1, 1, 1, 0, 1, 1, 0, 0]);
    }
}
