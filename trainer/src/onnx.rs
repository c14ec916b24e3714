//! ONNX export written from Rust (libtorch has no exporter): the graphs of the image and text
//! encoders, built node by node from the tch model's weights with the protobuf types of `tract-onnx`.
//!
//! - `image_encoder.onnx`: `pixel_values` f32 `[batch, 3, S, S]` -> `image_embeds` f32 `[batch, D]`
//! - `text_encoder.onnx`: `input_ids` i64 `[batch, sequence <= 77]` -> `text_embeds` f32 `[batch, D]`,
//!   pooled at the first end token (ArgMax over ids cast to int32, as OpenAI's and HF's exports)
//!
//! Opset 17 (LayerNormalization). Embeddings are projected, not normalised. With fp16 precision the
//! weights and the computation are half precision; inputs and outputs stay f32.

use prost::Message;
use tch::{Kind, Tensor};
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use crate::error::{Error, Result};
use crate::model::ClipConfig;

pub const OPSET: i64 = 17;
pub const IMAGE_INPUT: &str = "pixel_values";
pub const IMAGE_OUTPUT: &str = "image_embeds";
pub const TEXT_INPUT: &str = "input_ids";
pub const TEXT_OUTPUT: &str = "text_embeds";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "fp16" => Ok(Precision::Fp16),
            other => Err(format!("unknown precision {other:?} (fp32 or fp16)")),
        }
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}
fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}
fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

/// A graph under construction: nodes, weights and fresh value names.
struct Builder<'a> {
    weights: &'a std::collections::HashMap<String, Tensor>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    next: usize,
    dtype: DataType,
}

impl<'a> Builder<'a> {
    fn new(
        weights: &'a std::collections::HashMap<String, Tensor>,
        precision: Precision,
    ) -> Builder<'a> {
        let dtype = if precision == Precision::Fp16 {
            DataType::Float16
        } else {
            DataType::Float
        };
        Builder {
            weights,
            nodes: Vec::new(),
            inits: Vec::new(),
            next: 0,
            dtype,
        }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("{hint}_{}", self.next)
    }

    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        hint: &str,
    ) -> String {
        let out = self.fresh(hint);
        self.nodes.push(NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("{op}_{}", self.next),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    /// A float initializer (in the graph's precision) from a tensor.
    fn float_init(&mut self, name: &str, t: &Tensor) -> Result<String> {
        let t = t
            .to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .contiguous();
        let values: Vec<f32> = Vec::<f32>::try_from(t.reshape([-1])).map_err(Error::Torch)?;
        let raw: Vec<u8> = if self.dtype == DataType::Float16 {
            values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect()
        } else {
            values.iter().flat_map(|v| v.to_le_bytes()).collect()
        };
        self.inits.push(TensorProto {
            name: name.into(),
            dims: t.size(),
            data_type: self.dtype as i32,
            raw_data: raw,
            ..Default::default()
        });
        Ok(name.into())
    }

    fn weight(&mut self, name: &str) -> Result<String> {
        let t = self
            .weights
            .get(name)
            .ok_or_else(|| Error::Config(format!("model has no {name}")))?
            .shallow_clone();
        self.float_init(name, &t)
    }

    /// A Linear weight `[out, in]` stored transposed for MatMul, optionally scaled.
    fn weight_t(&mut self, name: &str, scale: f64) -> Result<String> {
        let t = self
            .weights
            .get(name)
            .ok_or_else(|| Error::Config(format!("model has no {name}")))?;
        let t = t.tr() * scale;
        self.float_init(&format!("{name}.T"), &t)
    }

    fn scaled(&mut self, name: &str, scale: f64) -> Result<String> {
        let t = self
            .weights
            .get(name)
            .ok_or_else(|| Error::Config(format!("model has no {name}")))?;
        let t = t * scale;
        self.float_init(&format!("{name}.scaled"), &t)
    }

    fn i64_const(&mut self, hint: &str, values: &[i64]) -> String {
        let name = self.fresh(hint);
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits.push(TensorProto {
            name: name.clone(),
            dims: vec![values.len() as i64],
            data_type: DataType::Int64 as i32,
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    fn float_scalar(&mut self, hint: &str, v: f32) -> Result<String> {
        let name = self.fresh(hint);
        self.float_init(&name, &Tensor::from_slice(&[v]).reshape([1]))
    }

    fn linear(&mut self, x: &str, prefix: &str, scale: f64) -> Result<String> {
        let w = self.weight_t(&format!("{prefix}.weight"), scale)?;
        let y = self.node("MatMul", &[x, &w], vec![], "mm");
        if self.weights.contains_key(&format!("{prefix}.bias")) {
            let b = if scale == 1.0 {
                self.weight(&format!("{prefix}.bias"))?
            } else {
                self.scaled(&format!("{prefix}.bias"), scale)?
            };
            return Ok(self.node("Add", &[&y, &b], vec![], "bias"));
        }
        Ok(y)
    }

    fn layer_norm(&mut self, x: &str, prefix: &str, eps: f64) -> Result<String> {
        let w = self.weight(&format!("{prefix}.weight"))?;
        let b = self.weight(&format!("{prefix}.bias"))?;
        Ok(self.node(
            "LayerNormalization",
            &[x, &w, &b],
            vec![attr_int("axis", -1), attr_float("epsilon", eps as f32)],
            "ln",
        ))
    }

    fn activation(&mut self, x: &str, kind: &str) -> Result<String> {
        if kind == "gelu" {
            // 0.5 x (1 + erf(x / sqrt 2))
            let r2 = self.float_scalar("sqrt2", std::f32::consts::SQRT_2)?;
            let half = self.float_scalar("half", 0.5)?;
            let one = self.float_scalar("one", 1.0)?;
            let d = self.node("Div", &[x, &r2], vec![], "gelu");
            let e = self.node("Erf", &[&d], vec![], "gelu");
            let a = self.node("Add", &[&e, &one], vec![], "gelu");
            let m = self.node("Mul", &[x, &a], vec![], "gelu");
            return Ok(self.node("Mul", &[&m, &half], vec![], "gelu"));
        }
        let k = self.float_scalar("quick_gelu_k", 1.702)?;
        let s = self.node("Mul", &[x, &k], vec![], "qg");
        let s = self.node("Sigmoid", &[&s], vec![], "qg");
        Ok(self.node("Mul", &[x, &s], vec![], "qg"))
    }

    /// Multi-head scaled-dot-product attention of projected `q` `[b, tq, d]` (already scaled),
    /// `k`, `v` `[b, t, d]`; `mask`: additive `[tq, t]` or none. Returns `[b, heads, tq, hd]`.
    fn attention(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        heads: i64,
        hd: i64,
        mask: Option<&str>,
    ) -> String {
        let split = self.i64_const("split_shape", &[0, 0, heads, hd]);
        let mut heads_first = |x: &str, perm: &[i64], hint: &str| {
            let r = self.node("Reshape", &[x, &split], vec![], hint);
            self.node("Transpose", &[&r], vec![attr_ints("perm", perm)], hint)
        };
        let q = heads_first(q, &[0, 2, 1, 3], "q");
        let k = heads_first(k, &[0, 2, 3, 1], "k");
        let v = heads_first(v, &[0, 2, 1, 3], "v");
        let mut s = self.node("MatMul", &[&q, &k], vec![], "scores");
        if let Some(m) = mask {
            s = self.node("Add", &[&s, m], vec![], "masked");
        }
        let p = self.node("Softmax", &[&s], vec![attr_int("axis", -1)], "attn");
        self.node("MatMul", &[&p, &v], vec![], "ctx")
    }

    /// Pre-LN residual attention block; `mask`: additive `[T, T]` (causal text) or none.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        x: &str,
        prefix: &str,
        dim: i64,
        heads: i64,
        eps: f64,
        act: &str,
        mask: Option<&str>,
    ) -> Result<String> {
        let hd = dim / heads;
        let h = self.layer_norm(x, &format!("{prefix}.layer_norm1"), eps)?;
        let scale = (hd as f64).powf(-0.5);
        let q = self.linear(&h, &format!("{prefix}.self_attn.q_proj"), scale)?;
        let k = self.linear(&h, &format!("{prefix}.self_attn.k_proj"), 1.0)?;
        let v = self.linear(&h, &format!("{prefix}.self_attn.v_proj"), 1.0)?;
        let o = self.attention(&q, &k, &v, heads, hd, mask);
        let o = self.node(
            "Transpose",
            &[&o],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
            "ctx",
        );
        let merge = self.i64_const("merge_shape", &[0, 0, dim]);
        let o = self.node("Reshape", &[&o, &merge], vec![], "ctx");
        let o = self.linear(&o, &format!("{prefix}.self_attn.out_proj"), 1.0)?;
        let x = self.node("Add", &[x, &o], vec![], "res");
        let h = self.layer_norm(&x, &format!("{prefix}.layer_norm2"), eps)?;
        let h = self.linear(&h, &format!("{prefix}.mlp.fc1"), 1.0)?;
        let h = self.activation(&h, act)?;
        let h = self.linear(&h, &format!("{prefix}.mlp.fc2"), 1.0)?;
        Ok(self.node("Add", &[&x, &h], vec![], "res"))
    }

    fn cast_to_compute(&mut self, x: &str) -> String {
        if self.dtype == DataType::Float16 {
            self.node(
                "Cast",
                &[x],
                vec![attr_int("to", DataType::Float16 as i64)],
                "to_f16",
            )
        } else {
            x.to_string()
        }
    }

    fn cast_to_f32(&mut self, x: &str) -> String {
        if self.dtype == DataType::Float16 {
            self.node(
                "Cast",
                &[x],
                vec![attr_int("to", DataType::Float as i64)],
                "to_f32",
            )
        } else {
            x.to_string()
        }
    }

    fn finish(
        mut self,
        name: &str,
        input: ValueInfoProto,
        output_value: &str,
        output: ValueInfoProto,
    ) -> ModelProto {
        self.nodes.push(NodeProto {
            op_type: "Identity".into(),
            input: vec![output_value.into()],
            output: vec![output.name.clone()],
            name: "output".into(),
            ..Default::default()
        });
        let graph = GraphProto {
            name: name.into(),
            node: self.nodes,
            initializer: self.inits,
            input: vec![input],
            output: vec![output],
            ..Default::default()
        };
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "xray-clip trainer".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(graph),
            ..Default::default()
        }
    }
}

fn value_info(name: &str, dtype: DataType, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Ok(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                Err(p) => tensor_shape_proto::dimension::Value::DimParam(p.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: dtype as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn named_weights(vs: &tch::nn::VarStore) -> std::collections::HashMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach()))
        .collect()
}

impl Builder<'_> {
    /// Convolution (no bias) followed by inference-mode batch norm, folded into one Conv:
    /// w' = w g / sqrt(var + eps), b' = beta - mean g / sqrt(var + eps).
    fn conv_bn(
        &mut self,
        x: &str,
        conv: &str,
        bn: &str,
        stride: i64,
        relu: bool,
    ) -> Result<String> {
        let get = |name: String| -> Result<Tensor> {
            self.weights
                .get(&name)
                .map(|t| t.to_kind(Kind::Double))
                .ok_or_else(|| Error::Config(format!("model has no {name}")))
        };
        let w = get(format!("{conv}.weight"))?;
        let gamma = get(format!("{bn}.weight"))?;
        let beta = get(format!("{bn}.bias"))?;
        let mean = get(format!("{bn}.running_mean"))?;
        let var = get(format!("{bn}.running_var"))?;
        let factor = gamma / (var + BATCH_NORM_EPS).sqrt();
        let k = w.size()[2];
        let folded_w = &w * factor.view([-1, 1, 1, 1]);
        let folded_b = beta - mean * &factor;
        let w = self.float_init(&format!("{conv}.folded_weight"), &folded_w)?;
        let b = self.float_init(&format!("{conv}.folded_bias"), &folded_b)?;
        let y = self.node(
            "Conv",
            &[x, &w, &b],
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("strides", &[stride, stride]),
                attr_ints("pads", &[k / 2, k / 2, k / 2, k / 2]),
            ],
            "conv",
        );
        Ok(if relu {
            self.node("Relu", &[&y], vec![], "relu")
        } else {
            y
        })
    }

    /// A feature map `[b, dim, h, w]` as tokens `[b, h w, dim]`.
    fn tokens(&mut self, x: &str, dim: i64) -> String {
        let flat = self.i64_const("flat_shape", &[0, dim, -1]);
        let t = self.node("Reshape", &[x, &flat], vec![], "tokens");
        self.node(
            "Transpose",
            &[&t],
            vec![attr_ints("perm", &[0, 2, 1])],
            "tokens",
        )
    }

    fn avg_pool(&mut self, x: &str, k: i64) -> String {
        self.node(
            "AveragePool",
            &[x],
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("strides", &[k, k]),
            ],
            "avgpool",
        )
    }

    /// OpenAI's ModifiedResNet (see `model::ResNetTower`), batch norms folded.
    fn resnet(
        &mut self,
        x: &str,
        v: &crate::model::VisionConfig,
        layers: &[i64],
    ) -> Result<String> {
        let mut x = self.conv_bn(x, "visual.conv1", "visual.bn1", 2, true)?;
        x = self.conv_bn(&x, "visual.conv2", "visual.bn2", 1, true)?;
        x = self.conv_bn(&x, "visual.conv3", "visual.bn3", 1, true)?;
        x = self.avg_pool(&x, 2);
        for (i, &n) in layers.iter().enumerate() {
            for j in 0..n {
                let p = format!("visual.layer{}.{j}", i + 1);
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                let mut out =
                    self.conv_bn(&x, &format!("{p}.conv1"), &format!("{p}.bn1"), 1, true)?;
                out = self.conv_bn(&out, &format!("{p}.conv2"), &format!("{p}.bn2"), 1, true)?;
                if stride > 1 {
                    out = self.avg_pool(&out, stride);
                }
                out = self.conv_bn(&out, &format!("{p}.conv3"), &format!("{p}.bn3"), 1, false)?;
                let identity = if self
                    .weights
                    .contains_key(&format!("{p}.downsample.0.weight"))
                {
                    let pooled = if stride > 1 {
                        self.avg_pool(&x, stride)
                    } else {
                        x.clone()
                    };
                    self.conv_bn(
                        &pooled,
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        1,
                        false,
                    )?
                } else {
                    x.clone()
                };
                let sum = self.node("Add", &[&out, &identity], vec![], "res");
                x = self.node("Relu", &[&sum], vec![], "relu");
            }
        }
        // Attention pooling: tokens [b, hw, c], the mean token first, positions added; the mean
        // token is the only query.
        let dim = v.hidden_size * 32;
        let heads = v.num_attention_heads;
        let hd = dim / heads;
        let t = self.tokens(&x, dim);
        let axis1 = self.i64_const("axis1", &[1]);
        // Opset 17: ReduceMean takes its axes as an attribute.
        let mean = self.node(
            "ReduceMean",
            &[&t],
            vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)],
            "mean",
        );
        let t = self.node("Concat", &[&mean, &t], vec![attr_int("axis", 1)], "tokens");
        let pos = self.weight("visual.attnpool.positional_embedding")?;
        let t = self.node("Add", &[&t, &pos], vec![], "tokens");
        let zero = self.i64_const("zero", &[0]);
        let one = self.i64_const("one", &[1]);
        let first = self.node("Slice", &[&t, &zero, &one, &axis1], vec![], "query_token");
        let scale = (hd as f64).powf(-0.5);
        let q = self.linear(&first, "visual.attnpool.q_proj", scale)?;
        let k = self.linear(&t, "visual.attnpool.k_proj", 1.0)?;
        let vv = self.linear(&t, "visual.attnpool.v_proj", 1.0)?;
        let o = self.attention(&q, &k, &vv, heads, hd, None);
        let merge = self.i64_const("merge_shape", &[-1, dim]);
        let o = self.node("Reshape", &[&o, &merge], vec![], "ctx");
        self.linear(&o, "visual.attnpool.c_proj", 1.0)
    }
}

/// libtorch's (and PyTorch's) default batch-norm epsilon, which the tch model uses.
const BATCH_NORM_EPS: f64 = 1e-5;

/// The image encoder as an ONNX model (serialised).
pub fn image_encoder(
    vs: &tch::nn::VarStore,
    config: &ClipConfig,
    precision: Precision,
) -> Result<Vec<u8>> {
    let weights = named_weights(vs);
    let v = &config.vision_config;
    let mut b = Builder::new(&weights, precision);
    let x = b.cast_to_compute(IMAGE_INPUT);
    let out = match &v.resnet_layers {
        Some(layers) => b.resnet(&x, v, layers)?,
        None => b.vit(&x, v)?,
    };
    let out = b.cast_to_f32(&out);
    let s = v.image_size;
    let model = b.finish(
        "image_encoder",
        value_info(
            IMAGE_INPUT,
            DataType::Float,
            &[Err("batch"), Ok(3), Ok(s), Ok(s)],
        ),
        &out,
        value_info(
            IMAGE_OUTPUT,
            DataType::Float,
            &[Err("batch"), Ok(config.projection_dim)],
        ),
    );
    Ok(model.encode_to_vec())
}

impl Builder<'_> {
    /// The ViT image tower (HF names) up to the projected class token.
    fn vit(&mut self, x: &str, v: &crate::model::VisionConfig) -> Result<String> {
        let b = self;
        let w = b.weight("vision_model.embeddings.patch_embedding.weight")?;
        let x = b.node(
            "Conv",
            &[x, &w],
            vec![
                attr_ints("kernel_shape", &[v.patch_size, v.patch_size]),
                attr_ints("strides", &[v.patch_size, v.patch_size]),
            ],
            "patches",
        );
        let x = b.tokens(&x, v.hidden_size);
        // Class token broadcast to the batch: Expand to [batch, 1, D], batch read from the input's shape.
        let cls_t = b
            .weights
            .get("vision_model.embeddings.class_embedding")
            .ok_or_else(|| Error::Config("model has no class embedding".into()))?
            .reshape([1, 1, v.hidden_size]);
        let cls = b.float_init("vision_model.embeddings.class_embedding.1x1xD", &cls_t)?;
        let shape = b.node("Shape", &[&x], vec![], "shape");
        let zero = b.i64_const("zero", &[0]);
        let one = b.i64_const("one", &[1]);
        let batch = b.node("Slice", &[&shape, &zero, &one], vec![], "batch");
        let rest = b.i64_const("one_by_d", &[1, v.hidden_size]);
        let target = b.node(
            "Concat",
            &[&batch, &rest],
            vec![attr_int("axis", 0)],
            "cls_shape",
        );
        let cls = b.node("Expand", &[&cls, &target], vec![], "cls");
        let x = b.node("Concat", &[&cls, &x], vec![attr_int("axis", 1)], "tokens");
        let pos = b.weight("vision_model.embeddings.position_embedding.weight")?;
        let mut x = b.node("Add", &[&x, &pos], vec![], "embedded");
        x = b.layer_norm(&x, "vision_model.pre_layrnorm", v.layer_norm_eps)?;
        for i in 0..v.num_hidden_layers {
            x = b.block(
                &x,
                &format!("vision_model.encoder.layers.{i}"),
                v.hidden_size,
                v.num_attention_heads,
                v.layer_norm_eps,
                &v.hidden_act,
                None,
            )?;
        }
        let first = b.i64_const("first", &[0]);
        let pooled = b.node(
            "Gather",
            &[&x, &first],
            vec![attr_int("axis", 1)],
            "cls_out",
        );
        let squeeze_axes = b.i64_const("axis1", &[1]);
        let pooled = b.node("Squeeze", &[&pooled, &squeeze_axes], vec![], "cls_out");
        let pooled = b.layer_norm(&pooled, "vision_model.post_layernorm", v.layer_norm_eps)?;
        b.linear(&pooled, "visual_projection", 1.0)
    }
}

/// The text encoder as an ONNX model (serialised), with a dynamic sequence length.
pub fn text_encoder(
    vs: &tch::nn::VarStore,
    config: &ClipConfig,
    precision: Precision,
) -> Result<Vec<u8>> {
    let weights = named_weights(vs);
    let t = &config.text_config;
    let mut b = Builder::new(&weights, precision);
    let emb = b.weight("text_model.embeddings.token_embedding.weight")?;
    let x = b.node(
        "Gather",
        &[&emb, TEXT_INPUT],
        vec![attr_int("axis", 0)],
        "tok",
    );
    // Positions 0..T and the causal mask [T, T], sliced from constants of the full context.
    let shape = b.node("Shape", &[TEXT_INPUT], vec![], "ids_shape");
    let one = b.i64_const("one", &[1]);
    let two = b.i64_const("two", &[2]);
    let zero = b.i64_const("zero", &[0]);
    let len = b.node("Slice", &[&shape, &one, &two], vec![], "seq_len");
    let pos = b.weight("text_model.embeddings.position_embedding.weight")?;
    let pos = b.node("Slice", &[&pos, &zero, &len, &zero], vec![], "pos");
    let mut x = b.node("Add", &[&x, &pos], vec![], "embedded");
    let ctx = t.max_position_embeddings;
    let min = if precision == Precision::Fp16 {
        -65504.0f32
    } else {
        f32::MIN
    };
    let mask_t = Tensor::ones([ctx, ctx], (Kind::Float, tch::Device::Cpu)).triu(1) * min as f64;
    let mask = b.float_init("causal_mask", &mask_t)?;
    let zeros2 = b.i64_const("zeros2", &[0, 0]);
    let ends = b.node(
        "Concat",
        &[&len, &len],
        vec![attr_int("axis", 0)],
        "mask_end",
    );
    let axes01 = b.i64_const("axes01", &[0, 1]);
    let mask = b.node("Slice", &[&mask, &zeros2, &ends, &axes01], vec![], "mask");
    for i in 0..t.num_hidden_layers {
        x = b.block(
            &x,
            &format!("text_model.encoder.layers.{i}"),
            t.hidden_size,
            t.num_attention_heads,
            t.layer_norm_eps,
            &t.hidden_act,
            Some(&mask),
        )?;
    }
    x = b.layer_norm(&x, "text_model.final_layer_norm", t.layer_norm_eps)?;
    // End-token pooling: ArgMax over the ids (int32: ONNX Runtime has no int64 ArgMax), one row each.
    let ids32 = b.node(
        "Cast",
        &[TEXT_INPUT],
        vec![attr_int("to", DataType::Int32 as i64)],
        "ids32",
    );
    let eos = b.node(
        "ArgMax",
        &[&ids32],
        vec![attr_int("axis", -1), attr_int("keepdims", 1)],
        "eos",
    );
    let pooled = b.node(
        "GatherND",
        &[&x, &eos],
        vec![attr_int("batch_dims", 1)],
        "pooled",
    );
    let out = b.linear(&pooled, "text_projection", 1.0)?;
    let out = b.cast_to_f32(&out);
    let model = b.finish(
        "text_encoder",
        value_info(
            TEXT_INPUT,
            DataType::Int64,
            &[Err("batch"), Err("sequence")],
        ),
        &out,
        value_info(
            TEXT_OUTPUT,
            DataType::Float,
            &[Err("batch"), Ok(config.projection_dim)],
        ),
    );
    Ok(model.encode_to_vec())
}
