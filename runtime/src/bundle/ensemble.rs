//! Several bundles trained for the same labels, as one bundle: each encoder graph holds the
//! members' graphs side by side, and its output is the members' L2-normalised embeddings, each
//! scaled by 1/sqrt(N), concatenated. Every such vector has norm 1, and the cosine of two of them
//! is the mean of the members' cosines: the bundle scores an image by the members' mean cosine to
//! each label, with no change to the bundle format, the runtime, `classify` or the page.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;

use super::{
    Bundle, BundleWriter, Manifest, Provenance, FORMAT_VERSION, IMAGE_ENCODER, TEXT_ENCODER,
    TOKENIZER,
};
use crate::error::{Error, Result};
use crate::onnx_proto::{
    tensor_proto::DataType, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, ValueInfoProto,
};

/// ONNX Runtime (and protobuf) refuse a model file over 2 GiB.
const MAX_MODEL_BYTES: usize = (1 << 31) - 1;

/// The default-domain opset a merged graph must have at least (`Max` broadcasts from 8).
const MIN_OPSET: i64 = 8;

/// One member graph's input and output names, as its bundle's manifest records them.
pub struct MemberGraph<'a> {
    pub bytes: &'a [u8],
    /// For messages: the file it came from.
    pub path: PathBuf,
    pub input: &'a str,
    pub output: &'a str,
}

/// The members' graphs merged into one: one input (the first member's name and type), one output
/// (named `output`, `[batch, sum of the members' dims]`), member `i`'s names prefixed `m{i}/`.
pub fn merge_graphs(members: &[MemberGraph], output: &str) -> Result<Vec<u8>> {
    at_least_two(members.len())?;
    let scale = member_scale(members.len());
    let mut merged = GraphProto {
        name: "ensemble".into(),
        ..Default::default()
    };
    let mut opsets: BTreeMap<String, i64> = BTreeMap::new();
    let mut default_opset = None;
    let mut ir_version = 0;
    let mut parts = Vec::new();
    let mut output_infos = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let model = ModelProto::decode(m.bytes)
            .map_err(|e| Error::bundle(&m.path, format!("not an ONNX model: {e}")))?;
        ir_version = ir_version.max(model.ir_version);
        for o in &model.opset_import {
            let domain = if o.domain == "ai.onnx" { "" } else { &o.domain };
            if domain.is_empty() {
                // Operators change meaning between opsets: the members must agree.
                match default_opset {
                    None => default_opset = Some(o.version),
                    Some(v) if v == o.version => {}
                    Some(v) => {
                        return Err(Error::bundle(
                            &m.path,
                            format!("opset {} where the first member has opset {v}: export the members with the same opset", o.version),
                        ))
                    }
                }
            }
            let v = opsets.entry(domain.to_string()).or_insert(0);
            *v = (*v).max(o.version);
        }
        let mut graph = model
            .graph
            .ok_or_else(|| Error::bundle(&m.path, "no graph"))?;
        let named = |list: &[ValueInfoProto], name: &str, what: &str| {
            list.iter()
                .find(|v| v.name == name)
                .cloned()
                .ok_or_else(|| Error::bundle(&m.path, format!("has no {what} {name:?}")))
        };
        let input = named(&graph.input, m.input, "input")?;
        let out_info = named(&graph.output, m.output, "output")?;
        output_infos.push(out_info);
        let inputs = graph
            .input
            .iter()
            .filter(|v| !graph.initializer.iter().any(|t| t.name == v.name))
            .count();
        if inputs != 1 {
            return Err(Error::bundle(
                &m.path,
                format!("has {inputs} inputs: only single-input encoders can be merged"),
            ));
        }
        if graph
            .initializer
            .iter()
            .any(|t| t.data_location == Some(1) || !t.external_data.is_empty())
        {
            return Err(Error::bundle(
                &m.path,
                "keeps weights in external files: save it as one file first",
            ));
        }
        let common_input = members[0].input;
        if i == 0 {
            let mut input = input;
            input.name = common_input.to_string();
            merged.input.push(input);
        }
        let prefix = format!("m{i}/");
        let rename = |name: &str| -> String {
            if name.is_empty() {
                String::new()
            } else if name == m.input {
                common_input.to_string()
            } else {
                format!("{prefix}{name}")
            }
        };
        rename_graph(&mut graph, &rename);
        merged.node.append(&mut graph.node);
        merged.initializer.append(&mut graph.initializer);
        merged
            .sparse_initializer
            .append(&mut graph.sparse_initializer);
        merged.value_info.append(&mut graph.value_info);
        parts.push(rename(m.output));
    }
    let default_opset = default_opset.unwrap_or(1);
    if default_opset < MIN_OPSET {
        return Err(Error::bundle(
            &members[0].path,
            format!("opset {default_opset}: merging needs opset {MIN_OPSET} or later"),
        ));
    }
    let mut b = Nodes {
        nodes: &mut merged.node,
        inits: &mut merged.initializer,
        next: 0,
    };
    let eps = b.constant("ensemble/norm_eps", &[], &[1e-12]);
    let part_scale = b.constant("ensemble/member_scale", &[], &[scale]);
    let units: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, e)| b.unit_scaled(e, i, &eps, &part_scale))
        .collect();
    let unit_refs: Vec<&str> = units.iter().map(String::as_str).collect();
    b.push(
        "Concat",
        &unit_refs,
        output,
        vec![super::quantize::int_attr("axis", 1)],
    );
    merged.output.push(joined_output(&output_infos, output));
    let model = ModelProto {
        ir_version,
        producer_name: "xray-clip runtime ensemble".into(),
        opset_import: opsets
            .into_iter()
            .map(|(domain, version)| OperatorSetIdProto { domain, version })
            .collect(),
        graph: Some(merged),
        ..Default::default()
    };
    let bytes = model.encode_to_vec();
    if bytes.len() > MAX_MODEL_BYTES {
        return Err(Error::Ensemble(format!(
            "the merged encoder would have {} bytes; ONNX files stop at 2 GiB: fewer or smaller members",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn at_least_two(members: usize) -> Result<()> {
    if members < 2 {
        return Err(Error::Ensemble(
            "an ensemble needs at least two members".into(),
        ));
    }
    Ok(())
}

/// What each member's unit embedding is multiplied by: N such parts side by side have norm 1.
fn member_scale(members: usize) -> f32 {
    1.0 / (members as f32).sqrt()
}

/// The merged output's declared type: the first member's (float, `[batch, D]`) with D the sum of
/// the members' D where every member declares it, else left open.
fn joined_output(members: &[ValueInfoProto], name: &str) -> ValueInfoProto {
    use crate::onnx_proto::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value};
    let last_dim = |v: &ValueInfoProto| {
        let Value::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
        match t.shape.as_ref()?.dim.last()?.value.as_ref()? {
            Dim::DimValue(d) => Some(*d),
            Dim::DimParam(_) => None,
        }
    };
    let sum: Option<i64> = members.iter().map(last_dim).sum();
    let mut info = members[0].clone();
    info.name = name.to_string();
    if let Some(Value::TensorType(t)) = info.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        if let Some(last) = t.shape.as_mut().and_then(|s| s.dim.last_mut()) {
            last.value = sum.map(Dim::DimValue);
        }
    }
    info
}

/// Applies `rename` to every value name of a graph and its sub-graphs (If/Loop/Scan bodies name
/// values of the graph around them, so one renaming holds for all).
fn rename_graph(g: &mut GraphProto, rename: &impl Fn(&str) -> String) {
    for n in &mut g.node {
        for v in n.input.iter_mut().chain(n.output.iter_mut()) {
            *v = rename(v);
        }
        if !n.name.is_empty() {
            n.name = rename(&n.name);
        }
        for a in &mut n.attribute {
            if let Some(sub) = a.g.as_mut() {
                rename_graph(sub, rename);
            }
            for sub in &mut a.graphs {
                rename_graph(sub, rename);
            }
        }
    }
    for t in &mut g.initializer {
        t.name = rename(&t.name);
    }
    for s in &mut g.sparse_initializer {
        for t in s.values.iter_mut().chain(s.indices.iter_mut()) {
            t.name = rename(&t.name);
        }
    }
    for v in g
        .input
        .iter_mut()
        .chain(g.output.iter_mut())
        .chain(g.value_info.iter_mut())
    {
        v.name = rename(&v.name);
    }
}

/// Appends nodes and constants to the merged graph.
struct Nodes<'a> {
    nodes: &'a mut Vec<NodeProto>,
    inits: &'a mut Vec<TensorProto>,
    next: usize,
}

impl Nodes<'_> {
    fn constant(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        self.inits.push(TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    fn push(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) {
        self.next += 1;
        self.nodes.push(NodeProto {
            name: format!("ensemble/{op}_{}", self.next),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            attribute: attrs,
            ..Default::default()
        });
    }

    /// `e / max(||e||, eps) * scale` over the last axis, with operators whose meaning no opset
    /// since 8 changed (the reductions moved their axes to an input in 13 and 18).
    fn unit_scaled(&mut self, e: &str, i: usize, eps: &str, scale: &str) -> String {
        let n = |s: &str| format!("ensemble/m{i}_{s}");
        self.push("Mul", &[e, e], &n("squares"), vec![]);
        // The sum of squares as a MatMul with a column of ones sized from the embedding's shape.
        self.push("Shape", &[e], &n("shape"), vec![]);
        let last = n("last_dim");
        self.inits.push(TensorProto {
            name: n("minus_one"),
            dims: vec![1],
            data_type: DataType::Int64 as i32,
            raw_data: (-1i64).to_le_bytes().to_vec(),
            ..Default::default()
        });
        self.inits.push(TensorProto {
            name: n("ones_shape_tail"),
            dims: vec![1],
            data_type: DataType::Int64 as i32,
            raw_data: 1i64.to_le_bytes().to_vec(),
            ..Default::default()
        });
        self.push(
            "Gather",
            &[&n("shape"), &n("minus_one")],
            &last,
            vec![super::quantize::int_attr("axis", 0)],
        );
        self.push(
            "Concat",
            &[&last, &n("ones_shape_tail")],
            &n("ones_shape"),
            vec![super::quantize::int_attr("axis", 0)],
        );
        let one = self.constant(&n("one"), &[], &[1.0]);
        self.push("Expand", &[&one, &n("ones_shape")], &n("ones"), vec![]);
        self.push("MatMul", &[&n("squares"), &n("ones")], &n("sum"), vec![]);
        self.push("Sqrt", &[&n("sum")], &n("norm"), vec![]);
        self.push("Max", &[&n("norm"), eps], &n("norm_clamped"), vec![]);
        self.push("Div", &[e, &n("norm_clamped")], &n("unit"), vec![]);
        self.push("Mul", &[&n("unit"), scale], &n("scaled"), vec![]);
        n("scaled")
    }
}

/// The manifest and files of the ensemble of `members` (at least two bundles with the same labels,
/// templates and preprocessing), written to `out` as a new bundle named `name`.
pub fn write_ensemble(members: &[Bundle], name: &str, out: &Path, force: bool) -> Result<Bundle> {
    at_least_two(members.len())?;
    let first = &members[0];
    for m in members {
        check_compatible(first, m)?;
    }
    let image_files: Vec<Vec<u8>> = members
        .iter()
        .map(|m| m.read_verified(IMAGE_ENCODER))
        .collect::<Result<_>>()?;
    let first_image = &first.manifest.files[IMAGE_ENCODER];
    let image_out = first_image.output.clone().unwrap_or_default();
    let image = merge_graphs(
        &member_graphs(members, IMAGE_ENCODER, &image_files),
        &image_out,
    )?;
    drop(image_files);

    // A text encoder only when every member has one, with one tokenizer for all.
    let with_text = members.iter().all(Bundle::has_text_encoder);
    let text = if with_text {
        let tokenizer = first.read_verified(TOKENIZER)?;
        for m in &members[1..] {
            if m.manifest.files[TOKENIZER].sha256 != first.manifest.files[TOKENIZER].sha256 {
                return Err(Error::bundle(
                    &m.dir,
                    format!(
                        "has another tokenizer than {}: the members' text encoders must read the same token ids",
                        first.dir.display()
                    ),
                ));
            }
        }
        let files: Vec<Vec<u8>> = members
            .iter()
            .map(|m| m.read_verified(TEXT_ENCODER))
            .collect::<Result<_>>()?;
        let first_text = &first.manifest.files[TEXT_ENCODER];
        let out_name = first_text.output.clone().unwrap_or_default();
        let merged = merge_graphs(&member_graphs(members, TEXT_ENCODER, &files), &out_name)?;
        Some((
            merged,
            tokenizer,
            first_text.input.clone().unwrap_or_default(),
            out_name,
        ))
    } else {
        None
    };

    // Label embeddings: each member's (normalised on load) scaled by 1/sqrt(N), side by side.
    let scale = member_scale(members.len());
    let labels = first.manifest.labels.len();
    let dim: usize = members.iter().map(|m| m.manifest.embedding_dim).sum();
    let mut embeddings = Vec::with_capacity(labels * dim);
    for row in 0..labels {
        for m in members {
            let d = m.manifest.embedding_dim;
            embeddings.extend(
                m.label_embeddings[row * d..(row + 1) * d]
                    .iter()
                    .map(|v| v * scale),
            );
        }
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: name.to_string(),
        description: format!(
            "ensemble of {} bundles: the mean of their cosine similarities",
            members.len()
        ),
        labels: first.manifest.labels.clone(),
        templates: first.manifest.templates.clone(),
        embedding_dim: dim,
        logit_scale: members.iter().map(|m| m.manifest.logit_scale).sum::<f32>()
            / members.len() as f32,
        image_embeds_normalized: true,
        preprocessing: first.manifest.preprocessing.clone(),
        files: Default::default(),
        provenance: provenance(members),
        quantization: None,
        self_check: None,
        calibration: None,
    };
    let image_in = first_image.input.clone().unwrap_or_default();
    let mut w = BundleWriter::create(out, manifest, force)?;
    w.add_file(
        IMAGE_ENCODER,
        "image_encoder.onnx",
        &image,
        Some((&image_in, &image_out)),
    )?;
    if let Some((text, tokenizer, text_in, text_out)) = &text {
        w.add_file(
            TEXT_ENCODER,
            "text_encoder.onnx",
            text,
            Some((text_in, text_out)),
        )?;
        w.add_file(TOKENIZER, "tokenizer.json", tokenizer, None)?;
    }
    w.add_label_embeddings(&embeddings)?;
    w.finish()
}

/// The members' encoder files of one role with the names their manifests give them.
fn member_graphs<'a>(
    members: &'a [Bundle],
    role: &str,
    files: &'a [Vec<u8>],
) -> Vec<MemberGraph<'a>> {
    members
        .iter()
        .zip(files)
        .map(|(m, bytes)| {
            let entry = &m.manifest.files[role];
            MemberGraph {
                bytes,
                path: m.dir.join(&entry.path),
                input: entry.input.as_deref().unwrap_or(""),
                output: entry.output.as_deref().unwrap_or(""),
            }
        })
        .collect()
}

/// Refuses a member that would not score the same question as the first.
fn check_compatible(first: &Bundle, m: &Bundle) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::bundle(
            &m.dir,
            format!(
                "has other {what} than {}: ensemble members must share labels, templates and preprocessing",
                first.dir.display()
            ),
        ))
    };
    let ids = |b: &Bundle| -> Vec<(String, String)> {
        b.manifest
            .labels
            .iter()
            .map(|l| (l.label.id.clone(), l.label.name.clone()))
            .collect()
    };
    if ids(m) != ids(first) {
        return refuse("labels");
    }
    if m.manifest.templates != first.manifest.templates {
        return refuse("templates");
    }
    if m.manifest.preprocessing != first.manifest.preprocessing {
        return refuse("preprocessing");
    }
    if let Some(q) = &m.manifest.quantization {
        return Err(Error::bundle(
            &m.dir,
            format!(
                "is {} (quantized): merge the fp32 bundles, then quantize the ensemble",
                q.precision
            ),
        ));
    }
    for role in [IMAGE_ENCODER, TEXT_ENCODER] {
        if let Some(e) = m.manifest.files.get(role) {
            if e.input.is_none() || e.output.is_none() {
                return Err(Error::bundle(
                    &m.dir,
                    format!("its manifest names no input or output of the {role}"),
                ));
            }
        }
    }
    Ok(())
}

/// The members' provenance: their data set and split where they all share them (then `runtime
/// eval` scores the ensemble on that split's test part), their validation rows where they all
/// held out the same ones, and each member's own record.
fn provenance(members: &[Bundle]) -> Provenance {
    let p0 = &members[0].manifest.provenance;
    let same = |f: &dyn Fn(&Provenance) -> String| {
        members.iter().all(|m| f(&m.manifest.provenance) == f(p0))
    };
    let shared_data = same(&|p| p.dataset.clone()) && same(&|p| p.split.clone());
    let held_out = |p: &Provenance| (p.training["val"].clone(), p.training["seed"].clone());
    let same_val = members
        .iter()
        .all(|m| held_out(&m.manifest.provenance) == held_out(p0));
    let mut training = serde_json::Map::new();
    if shared_data && same_val {
        for key in ["val", "seed"] {
            if !p0.training[key].is_null() {
                training.insert(key.into(), p0.training[key].clone());
            }
        }
    }
    let records: Vec<serde_json::Value> = members
        .iter()
        .map(|m| {
            let p = &m.manifest.provenance;
            serde_json::json!({
                "name": m.manifest.name,
                "image_encoder_sha256": m.manifest.files[IMAGE_ENCODER].sha256,
                "base_weights": p.base_weights,
                "training": p.training,
                "metrics": p.metrics,
            })
        })
        .collect();
    training.insert("ensemble_members".into(), records.into());
    Provenance {
        base_weights: format!(
            "ensemble of {}",
            members
                .iter()
                .map(|m| m.manifest.provenance.base_weights.as_str())
                .collect::<Vec<_>>()
                .join(" + ")
        ),
        dataset: if shared_data {
            p0.dataset.clone()
        } else {
            String::new()
        },
        split: if shared_data {
            p0.split.clone()
        } else {
            String::new()
        },
        training: training.into(),
        metrics: serde_json::Value::Null,
        license: distinct(members, |p| &p.license),
        notes: distinct(members, |p| &p.notes),
    }
}

/// The members' distinct non-empty values of a provenance field, joined by "; ".
fn distinct(members: &[Bundle], field: impl Fn(&Provenance) -> &String) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for m in members {
        let v = field(&m.manifest.provenance).as_str();
        if !v.is_empty() && !seen.contains(&v) {
            seen.push(v);
        }
    }
    seen.join("; ")
}
