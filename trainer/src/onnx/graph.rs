//! A small ONNX graph builder: typed attributes, initializers from tch tensors (fp32 or fp16), fresh
//! value names, and the generic operators the CLIP graphs are made of. Knows nothing about CLIP.

use runtime::onnx_proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use tch::{Kind, Tensor};

use super::{Precision, OPSET};
use crate::error::{Error, Result};

pub(crate) fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}
pub(crate) fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}
pub(crate) fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

/// A graph under construction: nodes, weights and fresh value names.
pub(crate) struct Builder<'a> {
    pub(crate) weights: &'a std::collections::HashMap<String, Tensor>,
    pub(crate) nodes: Vec<NodeProto>,
    pub(crate) inits: Vec<TensorProto>,
    pub(crate) next: usize,
    pub(crate) dtype: DataType,
}

impl<'a> Builder<'a> {
    pub(crate) fn new(
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

    pub(crate) fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("{hint}_{}", self.next)
    }

    pub(crate) fn node(
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
    pub(crate) fn float_init(&mut self, name: &str, t: &Tensor) -> Result<String> {
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

    pub(crate) fn weight(&mut self, name: &str) -> Result<String> {
        let t = self
            .weights
            .get(name)
            .ok_or_else(|| Error::MissingWeight(name.to_string()))?
            .shallow_clone();
        self.float_init(name, &t)
    }

    /// A Linear weight `[out, in]` stored transposed for MatMul, optionally scaled.
    pub(crate) fn weight_t(&mut self, name: &str, scale: f64) -> Result<String> {
        let t = self
            .weights
            .get(name)
            .ok_or_else(|| Error::MissingWeight(name.to_string()))?;
        let t = t.tr() * scale;
        self.float_init(&format!("{name}.T"), &t)
    }

    pub(crate) fn scaled(&mut self, name: &str, scale: f64) -> Result<String> {
        let t = self
            .weights
            .get(name)
            .ok_or_else(|| Error::MissingWeight(name.to_string()))?;
        let t = t * scale;
        self.float_init(&format!("{name}.scaled"), &t)
    }

    pub(crate) fn i64_const(&mut self, hint: &str, values: &[i64]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(hint, values.len(), DataType::Int64, raw)
    }

    /// An f32 constant whatever the graph's precision (for the f32 part after the encoder).
    pub(crate) fn f32_const(&mut self, hint: &str, values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(hint, values.len(), DataType::Float, raw)
    }

    /// A 1-D initializer of `len` values of `data_type`, little-endian bytes.
    fn constant(&mut self, hint: &str, len: usize, data_type: DataType, raw: Vec<u8>) -> String {
        let name = self.fresh(hint);
        self.inits.push(TensorProto {
            name: name.clone(),
            dims: vec![len as i64],
            data_type: data_type as i32,
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    pub(crate) fn float_scalar(&mut self, hint: &str, v: f32) -> Result<String> {
        let name = self.fresh(hint);
        self.float_init(&name, &Tensor::from_slice(&[v]).reshape([1]))
    }

    pub(crate) fn linear(&mut self, x: &str, prefix: &str, scale: f64) -> Result<String> {
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

    pub(crate) fn layer_norm(&mut self, x: &str, prefix: &str, eps: f64) -> Result<String> {
        let w = self.weight(&format!("{prefix}.weight"))?;
        let b = self.weight(&format!("{prefix}.bias"))?;
        Ok(self.node(
            "LayerNormalization",
            &[x, &w, &b],
            vec![attr_int("axis", -1), attr_float("epsilon", eps as f32)],
            "ln",
        ))
    }

    pub(crate) fn activation(&mut self, x: &str, kind: &str) -> Result<String> {
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
    pub(crate) fn attention(
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
    /// `first_token_only`: the block returns `[b, 1, d]`, the first token's row alone. Keys and
    /// values still come from every token, but the query, the output projection and the MLP run
    /// for one row instead of T: in a ViT's last block, where only the class token is read, that
    /// is the same result for about 10/12 of the block's work less.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block(
        &mut self,
        x: &str,
        prefix: &str,
        dim: i64,
        heads: i64,
        eps: f64,
        act: &str,
        mask: Option<&str>,
        first_token_only: bool,
    ) -> Result<String> {
        let hd = dim / heads;
        let h = self.layer_norm(x, &format!("{prefix}.layer_norm1"), eps)?;
        let (hq, x) = if first_token_only {
            (self.first_token(&h), self.first_token(x))
        } else {
            (h.clone(), x.to_string())
        };
        let x = x.as_str();
        let scale = (hd as f64).powf(-0.5);
        let q = self.linear(&hq, &format!("{prefix}.self_attn.q_proj"), scale)?;
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

    /// `x[:, 0:1, :]`.
    pub(crate) fn first_token(&mut self, x: &str) -> String {
        let zero = self.i64_const("zero", &[0]);
        let one = self.i64_const("one", &[1]);
        self.node("Slice", &[x, &zero, &one, &one], vec![], "first_token")
    }

    pub(crate) fn cast_to_compute(&mut self, x: &str) -> String {
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

    pub(crate) fn cast_to_f32(&mut self, x: &str) -> String {
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

    pub(crate) fn finish(
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

pub(crate) fn value_info(
    name: &str,
    dtype: DataType,
    dims: &[Result<i64, &str>],
) -> ValueInfoProto {
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
