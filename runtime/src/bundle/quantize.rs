//! int8 encoders (`runtime quantize`, `trainer export --precision int8`): the weights of MatMul,
//! Gemm and Conv (a ResNet tower's; not a ViT's lone patch embedding) and the text tower's token
//! table (a Gather) stored as int8, symmetric, one scale per output channel (per row for the
//! table). MatMul/Gemm compute in integers, their activations quantized per tensor to uint8 at run
//! time (`DynamicQuantizeLinear`) or with fixed scales from calibration images (`QuantizeLinear`);
//! Conv weights are dequantized in front of a float Conv (see `Rewriter::conv`). Written as
//! standard ONNX operators (`DynamicQuantizeLinear`, `QuantizeLinear`, `DequantizeLinear`,
//! `MatMulInteger`, `Cast`, `Mul`), which ONNX Runtime's CPU provider and ONNX Runtime Web run and
//! which ORT fuses into its own quantized kernels.
//!
//! MatMul/Gemm weights stay within [-63, 63], as ONNX Runtime's `reduce_range`: its `uint8 x int8`
//! kernel sums products in pairs in 16 bits on AVX2 without VNNI and saturates beyond 7-bit weights
//! (measured here: tiny ViT embeddings fell to cosine 0.89 with +-127). `full_range` lifts that for
//! VNNI machines. Convolutions and embedding tables use [-127, 127] (no such kernel; the UNIFESP
//! ResNet agreed better with fp32 so: README).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use prost::Message;

use crate::error::{Error, Result};
use crate::onnx_proto::attribute_proto::AttributeType;
use crate::onnx_proto::tensor_proto::DataType;
use crate::onnx_proto::{AttributeProto, ModelProto, NodeProto, TensorProto};

pub use super::quantization::{AgreementCheck, Quantization, QuantizeStats};

/// Activation ranges (smallest, largest value) by tensor name, measured on calibration images
/// ([`activation_ranges`]): these activations get fixed scales (`QuantizeLinear`) instead of
/// scales computed at run time.
pub type ActivationRanges = HashMap<String, (f32, f32)>;

/// Options of [`quantize_model`].
#[derive(Debug, Clone, Copy, Default)]
pub struct QuantizeOptions<'a> {
    /// MatMul/Gemm weights in [-127, 127] instead of [-63, 63] (machines with VNNI).
    pub full_range: bool,
    /// Static activation scales where a range is known (the rest stay dynamic).
    pub activation_ranges: Option<&'a ActivationRanges>,
}

/// The quantized model (serialised) of the ONNX model `bytes` (`path` names it in errors).
pub fn quantize_model(
    bytes: &[u8],
    path: &Path,
    opts: QuantizeOptions,
) -> Result<(Vec<u8>, QuantizeStats)> {
    let (model, stats, _) = rewrite_model(bytes, path, opts)?;
    Ok((model.encode_to_vec(), stats))
}

/// The activations (tensor names) that [`quantize_model`] quantizes: the float inputs of the
/// layers it makes integer, sorted.
pub fn quantized_activations(bytes: &[u8], path: &Path) -> Result<Vec<String>> {
    let (_, _, mut names) = rewrite_model(bytes, path, QuantizeOptions::default())?;
    names.sort();
    Ok(names)
}

/// `bytes` with the tensors `names` added as float graph outputs (graph inputs among them are
/// left out: their values are what the caller feeds), so one run yields them.
pub fn with_outputs(bytes: &[u8], path: &Path, names: &[String]) -> Result<Vec<u8>> {
    use crate::onnx_proto::{type_proto, TypeProto, ValueInfoProto};
    let mut model = ModelProto::decode(bytes).map_err(|e| Error::Bundle {
        bundle: path.to_path_buf(),
        reason: format!("not an ONNX model: {e}"),
    })?;
    if let Some(graph) = model.graph.as_mut() {
        let present: HashSet<String> = graph
            .output
            .iter()
            .chain(&graph.input)
            .map(|v| v.name.clone())
            .collect();
        for name in names.iter().filter(|n| !present.contains(*n)) {
            graph.output.push(ValueInfoProto {
                name: name.clone(),
                r#type: Some(TypeProto {
                    value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                        elem_type: DataType::Float as i32,
                        shape: None,
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    Ok(model.encode_to_vec())
}

/// uint8 scale and zero point of a value range, as `DynamicQuantizeLinear` computes them at run
/// time: the range widened to hold 0, zero point rounded half to even.
pub fn uint8_parameters(lo: f32, hi: f32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = (hi - lo) / 255.0;
    if !(scale > 0.0 && scale.is_finite()) {
        return (1.0, 0);
    }
    let zero_point = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as u8;
    (scale, zero_point)
}

fn rewrite_model(
    bytes: &[u8],
    path: &Path,
    opts: QuantizeOptions,
) -> Result<(ModelProto, QuantizeStats, Vec<String>)> {
    let bad = |reason: String| Error::Bundle {
        bundle: path.to_path_buf(),
        reason,
    };
    let mut model =
        ModelProto::decode(bytes).map_err(|e| bad(format!("not an ONNX model: {e}")))?;
    let opset = model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .unwrap_or(0);
    if opset < 11 {
        return Err(bad(format!(
            "opset {opset}: quantization needs opset 11 or later (DynamicQuantizeLinear)"
        )));
    }
    let graph = model.graph.as_mut().ok_or_else(|| bad("no graph".into()))?;
    let weight_max = if opts.full_range { 127 } else { 63 };
    let mut q = Rewriter {
        floats: graph
            .initializer
            .iter()
            .enumerate()
            .filter(|(_, t)| t.data_type == DataType::Float as i32)
            .map(|(i, t)| (t.name.clone(), i))
            .collect(),
        new_inits: Vec::new(),
        quantized_inputs: HashMap::new(),
        names: HashSet::new(),
        weight_max,
        stats: QuantizeStats {
            weight_max,
            ..Default::default()
        },
        opset,
        convs: true,
        ranges: opts.activation_ranges,
    };
    q.names
        .extend(graph.node.iter().flat_map(|n| n.output.iter().cloned()));
    q.names
        .extend(graph.initializer.iter().map(|t| t.name.clone()));
    q.names.extend(graph.input.iter().map(|i| i.name.clone()));
    // torch.onnx sometimes hands a weight to its MatMul through an Identity node.
    for n in &graph.node {
        if n.op_type == "Identity" && n.domain.is_empty() {
            if let (Some(i), Some(o)) = (n.input.first(), n.output.first()) {
                if let Some(&w) = q.floats.get(i) {
                    q.floats.insert(o.clone(), w);
                }
            }
        }
    }
    // A lone Conv is a ViT's patch embedding: 3% of its weights, left float; a ResNet tower's
    // convolutions are its weights, and are stored as int8.
    q.convs = graph.node.iter().filter(|n| n.op_type == "Conv").count() > 1;
    let mut nodes = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        match q.rewrite(&node, &graph.initializer) {
            Some(new) => nodes.extend(new),
            None => nodes.push(node),
        }
    }
    graph.node = nodes;
    // Identities that fed only quantized weights go, then float weights no node reads any more;
    // the others stay.
    let consumed: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name.clone()))
        .collect();
    graph
        .node
        .retain(|n| n.op_type != "Identity" || n.output.iter().any(|o| consumed.contains(o)));
    let used: HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .chain(graph.output.iter().map(|o| o.name.as_str()))
        .collect();
    let unused: HashSet<String> = graph
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| !used.contains(n.as_str()))
        .collect();
    graph.initializer.retain(|t| !unused.contains(&t.name));
    graph.input.retain(|i| !unused.contains(&i.name));
    graph.initializer.extend(q.new_inits);
    q.stats.float_weights = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == DataType::Float as i32)
        .map(|t| t.dims.iter().product::<i64>().max(1) as usize)
        .sum();
    let activations = q.quantized_inputs.into_keys().collect();
    Ok((model, q.stats, activations))
}

/// The values of a float initializer stored in the file (raw or `float_data`).
fn float_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != DataType::Float as i32 || !t.external_data.is_empty() {
        return None;
    }
    let n: i64 = t.dims.iter().product();
    let v: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    (v.len() as i64 == n).then_some(v)
}

/// Symmetric per-channel quantization along `axis`: `q = round(w / s)` with `s = max|w| /
/// weight_max` over the channel (1 for an all-zero channel).
fn per_channel(w: &[f32], dims: &[i64], axis: usize, weight_max: i32) -> (Vec<i8>, Vec<f32>) {
    let channels = dims[axis] as usize;
    let inner: usize = dims[axis + 1..].iter().product::<i64>() as usize;
    let mut max = vec![0f32; channels];
    for (i, v) in w.iter().enumerate() {
        let c = (i / inner) % channels;
        max[c] = max[c].max(v.abs());
    }
    let scales: Vec<f32> = max
        .iter()
        .map(|&m| if m > 0.0 { m / weight_max as f32 } else { 1.0 })
        .collect();
    let limit = weight_max as f32;
    let q = w
        .iter()
        .enumerate()
        .map(|(i, v)| {
            (v / scales[(i / inner) % channels])
                .round()
                .clamp(-limit, limit) as i8
        })
        .collect();
    (q, scales)
}

struct Rewriter<'a> {
    /// Float initializers by name (and by the Identity outputs that pass them on): their index.
    /// Values are decoded only for the weights that are quantized.
    floats: HashMap<String, usize>,
    new_inits: Vec<TensorProto>,
    /// Activations already quantized: name -> (uint8 tensor, scale, zero point).
    quantized_inputs: HashMap<String, (String, String, String)>,
    names: HashSet<String>,
    weight_max: i32,
    stats: QuantizeStats,
    opset: i64,
    /// Whether Conv layers are quantized.
    convs: bool,
    ranges: Option<&'a ActivationRanges>,
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

pub(crate) fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

impl Rewriter<'_> {
    fn fresh(&mut self, hint: &str) -> String {
        let mut name = hint.to_string();
        let mut i = 1;
        while !self.names.insert(name.clone()) {
            i += 1;
            name = format!("{hint}_{i}");
        }
        name
    }

    fn init(&mut self, hint: &str, dims: &[i64], data_type: DataType, raw: Vec<u8>) -> String {
        let name = self.fresh(hint);
        self.new_inits.push(TensorProto {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: data_type as i32,
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    fn f32_init(&mut self, hint: &str, dims: &[i64], v: &[f32]) -> String {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.init(hint, dims, DataType::Float, raw)
    }

    fn i8_init(&mut self, hint: &str, dims: &[i64], v: &[i8]) -> String {
        let raw = v.iter().map(|&x| x as u8).collect();
        self.init(hint, dims, DataType::Int8, raw)
    }

    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        out: Option<&str>,
        attrs: Vec<AttributeProto>,
        hint: &str,
    ) -> (NodeProto, String) {
        let output = match out {
            Some(o) => o.to_string(),
            None => self.fresh(hint),
        };
        let name = self.fresh(&format!("{hint}_node"));
        let node = NodeProto {
            op_type: op.into(),
            name,
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            attribute: attrs,
            ..Default::default()
        };
        (node, output)
    }

    /// `DynamicQuantizeLinear(x)`, or `QuantizeLinear(x)` with fixed parameters where its range
    /// was measured; once per activation.
    fn quantize_input(&mut self, x: &str, nodes: &mut Vec<NodeProto>) -> (String, String, String) {
        if let Some(q) = self.quantized_inputs.get(x) {
            return q.clone();
        }
        if let Some(&(lo, hi)) = self.ranges.and_then(|r| r.get(x)) {
            let (scale, zero_point) = uint8_parameters(lo, hi);
            let base = format!("{x}_q");
            let s = self.f32_init(&format!("{base}_scale"), &[], &[scale]);
            let z = self.init(
                &format!("{base}_zero_point"),
                &[],
                DataType::Uint8,
                vec![zero_point],
            );
            let (n, q) = self.node(
                "QuantizeLinear",
                &[x, &s, &z],
                None,
                vec![],
                &format!("{base}_uint8"),
            );
            nodes.push(n);
            self.stats.static_activations += 1;
            let out = (q, s, z);
            self.quantized_inputs.insert(x.into(), out.clone());
            return out;
        }
        let base = format!("{x}_dq");
        let (q, s, z) = (
            self.fresh(&format!("{base}_uint8")),
            self.fresh(&format!("{base}_scale")),
            self.fresh(&format!("{base}_zero_point")),
        );
        let name = self.fresh(&format!("{base}_node"));
        nodes.push(NodeProto {
            op_type: "DynamicQuantizeLinear".into(),
            name,
            input: vec![x.into()],
            output: vec![q.clone(), s.clone(), z.clone()],
            ..Default::default()
        });
        let out = (q, s, z);
        self.quantized_inputs.insert(x.into(), out.clone());
        out
    }

    /// `Cast(y_int32) * (x_scale * w_scales) [+ bias]` into `out`.
    fn rescale(
        &mut self,
        y32: &str,
        x_scale: &str,
        w_scales: &str,
        bias: Option<&str>,
        out: &str,
        nodes: &mut Vec<NodeProto>,
    ) {
        let (n, yf) = self.node(
            "Cast",
            &[y32],
            None,
            vec![int_attr("to", DataType::Float as i64)],
            &format!("{out}_float"),
        );
        nodes.push(n);
        let (n, scale) = self.node(
            "Mul",
            &[x_scale, w_scales],
            None,
            vec![],
            &format!("{out}_scale"),
        );
        nodes.push(n);
        let scaled = bias.is_none().then_some(out);
        let (n, y) = self.node(
            "Mul",
            &[&yf, &scale],
            scaled,
            vec![],
            &format!("{out}_rescaled"),
        );
        nodes.push(n);
        if let Some(b) = bias {
            let (n, _) = self.node("Add", &[&y, b], Some(out), vec![], &format!("{out}_bias"));
            nodes.push(n);
        }
    }

    fn weight(&self, name: &str, inits: &[TensorProto]) -> Option<(Vec<i64>, Vec<f32>)> {
        let t = &inits[*self.floats.get(name)?];
        Some((t.dims.clone(), float_values(t)?))
    }

    fn rewrite(&mut self, node: &NodeProto, inits: &[TensorProto]) -> Option<Vec<NodeProto>> {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return None;
        }
        match node.op_type.as_str() {
            "MatMul" => self.matmul(node, inits, false),
            "Gemm" => self.matmul(node, inits, true),
            "Conv" if self.convs => self.conv(node, inits),
            "Gather" if self.opset >= 13 => self.gather(node, inits),
            _ => None,
        }
    }

    /// `MatMul(A, W)` with `W` a `[K, N]` initializer (or `Gemm` with alpha = beta = 1, no transA).
    fn matmul(
        &mut self,
        node: &NodeProto,
        inits: &[TensorProto],
        gemm: bool,
    ) -> Option<Vec<NodeProto>> {
        let (a, b) = (node.input.first()?, node.input.get(1)?);
        let (mut dims, mut w) = self.weight(b, inits)?;
        if dims.len() != 2 {
            return None;
        }
        let mut bias = None;
        if gemm {
            let f = |n: &str, d: f32| attr(node, n).map_or(d, |a| a.f);
            let i = |n: &str| attr(node, n).map_or(0, |a| a.i);
            if f("alpha", 1.0) != 1.0 || f("beta", 1.0) != 1.0 || i("transA") != 0 {
                return None;
            }
            if i("transB") != 0 {
                let (n, k) = (dims[0] as usize, dims[1] as usize);
                let mut t = vec![0f32; w.len()];
                for r in 0..n {
                    for c in 0..k {
                        t[c * n + r] = w[r * k + c];
                    }
                }
                w = t;
                dims = vec![k as i64, n as i64];
            }
            bias = node.input.get(2).filter(|c| !c.is_empty()).cloned();
        }
        let (q, scales) = per_channel(&w, &dims, 1, self.weight_max);
        let mut nodes = Vec::new();
        let (aq, a_scale, a_zp) = self.quantize_input(a, &mut nodes);
        let wq = self.i8_init(&format!("{b}_int8"), &dims, &q);
        let ws = self.f32_init(&format!("{b}_scales"), &[dims[1]], &scales);
        let wz = self.i8_init(&format!("{b}_zero_point"), &[], &[0]);
        let (n, y32) = self.node(
            "MatMulInteger",
            &[&aq, &wq, &a_zp, &wz],
            None,
            vec![],
            &format!("{b}_int32"),
        );
        nodes.push(n);
        let out = node.output.first()?.clone();
        self.rescale(&y32, &a_scale, &ws, bias.as_deref(), &out, &mut nodes);
        self.stats.matmuls += 1;
        self.stats.int8_weights += q.len();
        Some(nodes)
    }

    /// `Conv(X, W[, B])` with `W` a `[M, C/group, k...]` initializer: `W` stored as int8, one
    /// scale per output channel, and turned back into float by `DequantizeLinear` (opset 13, per
    /// axis) in front of the float `Conv`; `X` stays float. ONNX Runtime's `ConvInteger` (integer
    /// input too) ran a ResNet tower 6 times slower than the float `Conv` on this AVX2 CPU
    /// (rn-small, batch 16: 19.9 against 3.1 ms per image), its own static QDQ `Conv` no faster
    /// than float (3.0 ms): on CPUs like this int8 convolutions buy size, not speed.
    fn conv(&mut self, node: &NodeProto, inits: &[TensorProto]) -> Option<Vec<NodeProto>> {
        if self.opset < 13 {
            return None;
        }
        let wname = node.input.get(1)?;
        let (dims, w) = self.weight(wname, inits)?;
        if dims.len() < 3 {
            return None;
        }
        let (q, scales) = per_channel(&w, &dims, 0, 127);
        let wq = self.i8_init(&format!("{wname}_int8"), &dims, &q);
        let ws = self.f32_init(&format!("{wname}_scales"), &[dims[0]], &scales);
        let (dq, w_float) = self.node(
            "DequantizeLinear",
            &[&wq, &ws],
            None,
            vec![int_attr("axis", 0)],
            &format!("{wname}_dequantized"),
        );
        let mut conv = node.clone();
        conv.input[1] = w_float;
        self.stats.convs += 1;
        self.stats.int8_weights += q.len();
        Some(vec![dq, conv])
    }

    /// `Gather(T, ids)` on axis 0 of a `[V, D]` table: int8 rows, one scale per row.
    fn gather(&mut self, node: &NodeProto, inits: &[TensorProto]) -> Option<Vec<NodeProto>> {
        let (t, ids) = (node.input.first()?, node.input.get(1)?);
        if attr(node, "axis").is_some_and(|a| a.i != 0) {
            return None;
        }
        let (dims, w) = self.weight(t, inits)?;
        if dims.len() != 2 || dims[0] < 256 {
            return None;
        }
        let (q, scales) = per_channel(&w, &dims, 0, 127);
        let tq = self.i8_init(&format!("{t}_int8"), &dims, &q);
        let ts = self.f32_init(&format!("{t}_scales"), &[dims[0]], &scales);
        let out = node.output.first()?.clone();
        let mut nodes = Vec::new();
        let (n, rows) = self.node("Gather", &[&tq, ids], None, vec![], &format!("{out}_int8"));
        nodes.push(n);
        let (n, row_scales) = self.node(
            "Gather",
            &[&ts, ids],
            None,
            vec![],
            &format!("{out}_scales"),
        );
        nodes.push(n);
        let (n, rows_f) = self.node(
            "Cast",
            &[&rows],
            None,
            vec![int_attr("to", DataType::Float as i64)],
            &format!("{out}_float"),
        );
        nodes.push(n);
        let last = self.init(
            &format!("{out}_last_axis"),
            &[1],
            DataType::Int64,
            (-1i64).to_le_bytes().to_vec(),
        );
        let (n, col) = self.node(
            "Unsqueeze",
            &[&row_scales, &last],
            None,
            vec![],
            &format!("{out}_scales_column"),
        );
        nodes.push(n);
        let (n, _) = self.node(
            "Mul",
            &[&rows_f, &col],
            Some(&out),
            vec![],
            &format!("{out}_rescaled"),
        );
        nodes.push(n);
        self.stats.gathers += 1;
        self.stats.int8_weights += q.len();
        Some(nodes)
    }
}

/// The method, in words, for the manifest.
pub fn scheme(weight_max: i32, static_image_activations: bool) -> String {
    let activations = if static_image_activations {
        "activations uint8 per tensor, the image encoder's with fixed scales from the calibration images' ranges (QuantizeLinear), the text encoder's at run time (DynamicQuantizeLinear)"
    } else {
        "activations uint8 per tensor at run time (DynamicQuantizeLinear)"
    };
    format!(
        "weights int8 per output channel, symmetric, MatMul/Gemm within +-{weight_max} (MatMulInteger), Conv and tables +-127 (Conv weights dequantized before a float Conv); MatMul/Gemm {activations}"
    )
}

/// The smallest and largest value of each activation the image encoder of `src` would quantize,
/// over `files` (preprocessed as the bundle says, `batch` at a time); and how many files were
/// read (unreadable ones are left out).
pub fn activation_ranges(
    src: &super::Bundle,
    files: &[std::path::PathBuf],
    engine: &crate::engine::EngineOptions,
    batch: usize,
) -> Result<(ActivationRanges, usize)> {
    let entry = &src.manifest.files[super::IMAGE_ENCODER];
    let path = src.dir.join(&entry.path);
    let bytes = src.read_verified(super::IMAGE_ENCODER)?;
    let names = quantized_activations(&bytes, &path)?;
    let probe = with_outputs(&bytes, &path, &names)?;
    let mut encoder = crate::engine::Encoder::from_bytes(
        &probe,
        &format!("{} (calibration)", path.display()),
        engine,
        (entry.input.as_deref(), entry.output.as_deref()),
    )?;
    let cfg = &src.manifest.preprocessing;
    let size = cfg.image_size as usize;
    let mut ranges = ActivationRanges::new();
    let mut read = 0;
    let bar = crate::progress::bar(files.len() as u64, "calibrating activations");
    for chunk in files.chunks(batch.max(1)) {
        let mut pixels = Vec::with_capacity(chunk.len() * cfg.tensor_len());
        for f in chunk {
            if let Ok(t) = crate::pipeline::load_tensor(f, cfg) {
                pixels.extend_from_slice(&t);
                read += 1;
            }
            bar.inc(1);
        }
        let n = pixels.len() / cfg.tensor_len();
        if n == 0 {
            continue;
        }
        let found = encoder.output_ranges(&[n, 3, size, size], &pixels, &names)?;
        for (name, (lo, hi)) in names.iter().zip(found) {
            let r = ranges.entry(name.clone()).or_insert((lo, hi));
            *r = (r.0.min(lo), r.1.max(hi));
        }
    }
    bar.finish_and_clear();
    if read == 0 {
        return Err(Error::Dataset(
            "none of the calibration images could be read".into(),
        ));
    }
    Ok((ranges, read))
}

/// The int8 encoders of `src` (the text encoder only where it has one). Activation ranges in
/// `opts` apply to the image encoder (they were measured there); the text encoder's activations
/// stay dynamic.
pub fn quantize_bundle(
    src: &super::Bundle,
    opts: QuantizeOptions,
) -> Result<(Vec<u8>, Option<Vec<u8>>, Quantization)> {
    let image_path = src.dir.join(&src.manifest.files[super::IMAGE_ENCODER].path);
    let (image, image_stats) =
        quantize_model(&src.read_verified(super::IMAGE_ENCODER)?, &image_path, opts)?;
    let text_opts = QuantizeOptions {
        activation_ranges: None,
        ..opts
    };
    let (text, text_stats) = if src.has_text_encoder() {
        let path = src.dir.join(&src.manifest.files[super::TEXT_ENCODER].path);
        let (bytes, stats) =
            quantize_model(&src.read_verified(super::TEXT_ENCODER)?, &path, text_opts)?;
        (Some(bytes), Some(stats))
    } else {
        (None, None)
    };
    let q = Quantization {
        precision: "int8".into(),
        scheme: scheme(image_stats.weight_max, image_stats.static_activations > 0),
        source: format!(
            "{} (image encoder sha256 {})",
            src.manifest.name,
            src.manifest.files[super::IMAGE_ENCODER].sha256
        ),
        image_encoder: image_stats,
        text_encoder: text_stats,
        calibration_images: 0,
        check: None,
    };
    Ok((image, text, q))
}

/// Writes the int8 bundle: `src`'s files with the quantized encoders, named `name`, its manifest
/// recording `quantization`.
pub fn write_bundle(
    src: &super::Bundle,
    image: &[u8],
    text: Option<&[u8]>,
    quantization: Quantization,
    name: &str,
    out: &Path,
    force: bool,
) -> Result<super::Bundle> {
    let mut manifest = src.manifest.clone();
    manifest.name = name.to_string();
    manifest.quantization = Some(quantization);
    super::write_copy(src, manifest, out, force, |role| match role {
        super::IMAGE_ENCODER => super::CopiedFile::Bytes(image),
        super::TEXT_ENCODER => text.map_or(super::CopiedFile::Drop, super::CopiedFile::Bytes),
        _ => super::CopiedFile::Same,
    })
}

/// Labelled images to check an int8 bundle on.
pub struct CheckSet<'a> {
    pub labels: &'a [crate::text::labels::Label],
    pub samples: &'a [crate::eval::datasets::Sample],
    /// For the record: the data set's name and which images.
    pub dataset: String,
    pub split: String,
}

/// Top-1 agreement, top-1 of each (a hit: any of an image's labels) and embedding cosines of two
/// engines on labelled images, each with its own label embeddings reordered to the set's labels.
pub fn agreement(
    fp32: &mut crate::engine::Engine,
    int8: &mut crate::engine::Engine,
    set: &CheckSet,
    pipeline: &crate::pipeline::PipelineOptions,
    min_agreement: f64,
) -> Result<AgreementCheck> {
    let files: Vec<std::path::PathBuf> = set.samples.iter().map(|s| s.path.clone()).collect();
    let emb_a = crate::pipeline::embed_files(fp32, &files, pipeline);
    let emb_b = crate::pipeline::embed_files(int8, &files, pipeline);
    let la = crate::eval::bundle_embeddings(fp32, set.labels)?;
    let lb = crate::eval::bundle_embeddings(int8, set.labels)?;
    let (sa, sb) = (
        fp32.bundle.manifest.logit_scale,
        int8.bundle.manifest.logit_scale,
    );
    let (mut n, mut same, mut hit_a, mut hit_b) = (0usize, 0usize, 0usize, 0usize);
    let (mut cos_sum, mut cos_min) = (0f64, f64::INFINITY);
    for ((s, a), b) in set.samples.iter().zip(emb_a).zip(emb_b) {
        let (Ok(a), Ok(b)) = (a, b) else { continue };
        let ta = crate::scoring::top_k(&crate::scoring::probabilities(&a, &la, sa), 1)[0];
        let tb = crate::scoring::top_k(&crate::scoring::probabilities(&b, &lb, sb), 1)[0];
        n += 1;
        same += usize::from(ta == tb);
        hit_a += usize::from(s.labels.contains(&ta));
        hit_b += usize::from(s.labels.contains(&tb));
        let c = crate::scoring::cosine(&a, &b);
        cos_sum += c;
        cos_min = cos_min.min(c);
    }
    if n == 0 {
        return Err(Error::Dataset(
            "none of the check images could be read".into(),
        ));
    }
    let f = n as f64;
    Ok(AgreementCheck {
        dataset: set.dataset.clone(),
        split: set.split.clone(),
        images: n,
        agreement: same as f64 / f,
        fp32_top1: hit_a as f64 / f,
        int8_top1: hit_b as f64 / f,
        mean_cosine: cos_sum / f,
        min_cosine: cos_min,
        min_agreement,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_parameters_are_dynamic_quantize_linears() {
        // ONNX DynamicQuantizeLinear: range widened to hold 0, scale = range / 255, zero point
        // = round_half_even(-min / scale), saturated.
        let (scale, zp) = uint8_parameters(-1.0, 3.0);
        assert_eq!((scale, zp), (4.0 / 255.0, 64)); // 63.75 -> 64
        assert_eq!(uint8_parameters(0.5, 2.0), (2.0 / 255.0, 0));
        assert_eq!(uint8_parameters(-2.0, -0.5), (2.0 / 255.0, 255));
        // exact halves round to the even neighbour: 0.5 -> 0, 1.5 -> 2
        assert_eq!(uint8_parameters(-0.5, 254.5), (1.0, 0));
        assert_eq!(uint8_parameters(-1.5, 253.5), (1.0, 2));
        // no range: a harmless scale
        assert_eq!(uint8_parameters(0.0, 0.0), (1.0, 0));
        assert_eq!(uint8_parameters(f32::NAN, 1.0).1, 0);
    }

    #[test]
    fn per_channel_scales_bound_the_error() {
        // [K=3, N=2]: columns are channels.
        let w = [0.5f32, -2.0, 0.25, 1.0, -0.5, 0.0];
        let (q, s) = per_channel(&w, &[3, 2], 1, 63);
        assert_eq!(s, vec![0.5 / 63.0, 2.0 / 63.0]);
        for (i, (&v, &qv)) in w.iter().zip(&q).enumerate() {
            let back = qv as f32 * s[i % 2];
            assert!((back - v).abs() <= s[i % 2] / 2.0 + 1e-7, "{v} -> {back}");
            assert!(qv.abs() <= 63);
        }
        // An all-zero channel keeps scale 1 and zeros.
        let (q, s) = per_channel(&[0.0, 1.0, 0.0, -1.0], &[2, 2], 1, 127);
        assert_eq!((q, s), (vec![0, 127, 0, -127], vec![1.0, 1.0 / 127.0]));
    }
}
