//! The CLIP encoders as ONNX graphs: ViT and ModifiedResNet image towers, the text transformer,
//! built from the tch model's weights with [`super::graph::Builder`].

use prost::Message;
use runtime::onnx_proto::tensor_proto::DataType;
use tch::{Kind, Tensor};

use super::graph::{attr_int, attr_ints, value_info, Builder};
use super::{Precision, IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT};
use crate::error::{Error, Result};
use crate::model::ClipConfig;

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
                .ok_or_else(|| Error::MissingWeight(name))
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
        let first = self.first_token(&t);
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
    let x = if v.test_time_flip {
        b.with_mirror(&x)
    } else {
        x
    };
    let out = match &v.resnet_layers {
        Some(layers) => b.resnet(&x, v, layers)?,
        None => b.vit(&x, v)?,
    };
    let mut out = b.cast_to_f32(&out);
    if v.test_time_flip {
        out = b.mirror_average(&out, config.projection_dim);
    }
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
    /// `[x; x mirrored left-right]` along the batch (test-time flip averaging).
    fn with_mirror(&mut self, x: &str) -> String {
        let last = self.i64_const("last", &[-1]);
        let before_first = self.i64_const("before_first", &[i64::MIN]);
        let width_axis = self.i64_const("width_axis", &[3]);
        let backwards = self.i64_const("backwards", &[-1]);
        let mirrored = self.node(
            "Slice",
            &[x, &last, &before_first, &width_axis, &backwards],
            vec![],
            "mirrored",
        );
        self.node(
            "Concat",
            &[x, &mirrored],
            vec![attr_int("axis", 0)],
            "with_mirror",
        )
    }

    /// The mean of the L2-normalised embeddings of the two halves of the batch made by
    /// [`with_mirror`](Self::with_mirror), as `model::Clip::image_features` (norm clamped at 1e-12).
    fn mirror_average(&mut self, e: &str, dim: i64) -> String {
        let norm = self.node(
            "ReduceL2",
            &[e],
            vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
            "norm",
        );
        let eps = self.f32_const("norm_eps", &[1e-12]);
        let norm = self.node("Max", &[&norm, &eps], vec![], "norm");
        let unit = self.node("Div", &[e, &norm], vec![], "unit");
        let halves = self.i64_const("two_halves", &[2, -1, dim]);
        let halves = self.node("Reshape", &[&unit, &halves], vec![], "halves");
        self.node(
            "ReduceMean",
            &[&halves],
            vec![attr_ints("axes", &[0]), attr_int("keepdims", 0)],
            "mirror_mean",
        )
    }

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
            .ok_or_else(|| Error::MissingWeight("vision_model.embeddings.class_embedding".into()))?
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
                // Only the class token leaves the tower: the last block computes its row alone.
                i + 1 == v.num_hidden_layers,
            )?;
        }
        let squeeze_axes = b.i64_const("axis1", &[1]);
        let pooled = b.node("Squeeze", &[&x, &squeeze_axes], vec![], "cls_out");
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
            false,
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
