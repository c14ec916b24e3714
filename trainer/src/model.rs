//! OpenAI's CLIP in tch, one configurable implementation. Parameter names follow HF transformers'
//! `CLIPModel`, so `model.safetensors` of `openai/clip-vit-base-patch32` loads as it is.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub image_size: i64,
    pub patch_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            image_size: 224,
            patch_size: 32,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            layer_norm_eps: 1e-5,
            hidden_act: "quick_gelu".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: i64,
    pub max_position_embeddings: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 49408,
            max_position_embeddings: 77,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            layer_norm_eps: 1e-5,
            hidden_act: "quick_gelu".into(),
        }
    }
}

/// The fields of HF's `config.json` that define the architecture (others are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    pub projection_dim: i64,
    pub logit_scale_init_value: f64,
}

impl Default for ClipConfig {
    /// ViT-B/32.
    fn default() -> Self {
        ClipConfig {
            text_config: TextConfig::default(),
            vision_config: VisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
        }
    }
}

impl ClipConfig {
    /// `vit-b-32` (default), `vit-b-16`, `vit-l-14`, `tiny` (tests), `small` (the demo bundle).
    pub fn preset(name: &str) -> Option<ClipConfig> {
        let mut c = ClipConfig::default();
        match name {
            "vit-b-32" | "ViT-B/32" => {}
            "vit-b-16" | "ViT-B/16" => c.vision_config.patch_size = 16,
            "vit-l-14" | "ViT-L/14" => {
                c.vision_config = VisionConfig {
                    patch_size: 14,
                    hidden_size: 1024,
                    intermediate_size: 4096,
                    num_hidden_layers: 24,
                    num_attention_heads: 16,
                    ..VisionConfig::default()
                };
                c.text_config.hidden_size = 768;
                c.text_config.intermediate_size = 3072;
                c.text_config.num_attention_heads = 12;
                c.projection_dim = 768;
            }
            "tiny" => {
                c.vision_config = VisionConfig {
                    hidden_size: 32,
                    intermediate_size: 64,
                    num_hidden_layers: 2,
                    num_attention_heads: 2,
                    ..VisionConfig::default()
                };
                c.text_config = TextConfig {
                    hidden_size: 16,
                    intermediate_size: 32,
                    num_hidden_layers: 2,
                    num_attention_heads: 2,
                    ..TextConfig::default()
                };
                c.projection_dim = 16;
            }
            "small" => {
                c.vision_config = VisionConfig {
                    hidden_size: 192,
                    intermediate_size: 768,
                    num_hidden_layers: 4,
                    num_attention_heads: 3,
                    ..VisionConfig::default()
                };
                c.text_config = TextConfig {
                    hidden_size: 128,
                    intermediate_size: 512,
                    num_hidden_layers: 2,
                    num_attention_heads: 2,
                    ..TextConfig::default()
                };
                c.projection_dim = 128;
            }
            _ => return None,
        }
        Some(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vision_config;
        let t = &self.text_config;
        let positive = [
            v.image_size,
            v.patch_size,
            v.hidden_size,
            v.intermediate_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            t.vocab_size,
            t.max_position_embeddings,
            t.hidden_size,
            t.intermediate_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            self.projection_dim,
        ];
        if positive.iter().any(|&x| x <= 0) {
            return Err("every size in the configuration must be positive".into());
        }
        if v.image_size % v.patch_size != 0 {
            return Err(format!(
                "image size {} is not a multiple of patch size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.hidden_size % v.num_attention_heads != 0 || t.hidden_size % t.num_attention_heads != 0
        {
            return Err("hidden size must be a multiple of the number of heads".into());
        }
        for act in [&v.hidden_act, &t.hidden_act] {
            if act != "quick_gelu" && act != "gelu" {
                return Err(format!(
                    "activation {act:?} is not supported (quick_gelu, gelu)"
                ));
            }
        }
        Ok(())
    }
}

fn activation(x: &Tensor, kind: &str) -> Tensor {
    if kind == "gelu" {
        x.gelu("none")
    } else {
        x * (x * 1.702).sigmoid()
    }
}

struct Attention {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    out: nn::Linear,
    heads: i64,
}

impl Attention {
    fn new(p: nn::Path, dim: i64, heads: i64) -> Attention {
        Attention {
            q: nn::linear(&p / "q_proj", dim, dim, Default::default()),
            k: nn::linear(&p / "k_proj", dim, dim, Default::default()),
            v: nn::linear(&p / "v_proj", dim, dim, Default::default()),
            out: nn::linear(&p / "out_proj", dim, dim, Default::default()),
            heads,
        }
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let (b, n, d) = x.size3().expect("[batch, tokens, dim]");
        let hd = d / self.heads;
        let split = |t: Tensor| t.view([b, n, self.heads, hd]).transpose(1, 2);
        let (q, k, v) = (
            split(self.q.forward(x)),
            split(self.k.forward(x)),
            split(self.v.forward(x)),
        );
        let y = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, causal, None, false,
        );
        self.out
            .forward(&y.transpose(1, 2).contiguous().view([b, n, d]))
    }
}

struct EncoderLayer {
    attn: Attention,
    ln1: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    ln2: nn::LayerNorm,
    act: String,
}

impl EncoderLayer {
    fn new(p: nn::Path, dim: i64, mlp: i64, heads: i64, eps: f64, act: &str) -> EncoderLayer {
        let ln = nn::LayerNormConfig {
            eps,
            ..Default::default()
        };
        EncoderLayer {
            attn: Attention::new(&p / "self_attn", dim, heads),
            ln1: nn::layer_norm(&p / "layer_norm1", vec![dim], ln),
            fc1: nn::linear(&p / "mlp" / "fc1", dim, mlp, Default::default()),
            fc2: nn::linear(&p / "mlp" / "fc2", mlp, dim, Default::default()),
            ln2: nn::layer_norm(&p / "layer_norm2", vec![dim], ln),
            act: act.to_string(),
        }
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let x = x + self.attn.forward(&self.ln1.forward(x), causal);
        let h = self.fc2.forward(&activation(
            &self.fc1.forward(&self.ln2.forward(&x)),
            &self.act,
        ));
        x + h
    }
}

fn encoder(
    p: nn::Path,
    n: i64,
    dim: i64,
    mlp: i64,
    heads: i64,
    eps: f64,
    act: &str,
) -> Vec<EncoderLayer> {
    (0..n)
        .map(|i| EncoderLayer::new(&p / "layers" / i, dim, mlp, heads, eps, act))
        .collect()
}

pub struct VisionTower {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: Tensor,
    pre_ln: nn::LayerNorm,
    layers: Vec<EncoderLayer>,
    post_ln: nn::LayerNorm,
    projection: nn::Linear,
}

pub struct TextTower {
    token_embedding: nn::Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_ln: nn::LayerNorm,
    projection: nn::Linear,
}

/// The CLIP model. Variables live in the `VarStore` it was built on.
pub struct Clip {
    pub config: ClipConfig,
    pub vision: VisionTower,
    pub text: TextTower,
    pub logit_scale: Tensor,
}

impl Clip {
    pub fn new(root: &nn::Path, config: &ClipConfig) -> Clip {
        let v = &config.vision_config;
        let t = &config.text_config;
        let vp = root / "vision_model";
        let grid = v.image_size / v.patch_size;
        let std = |s: f64| nn::Init::Randn {
            mean: 0.0,
            stdev: s,
        };
        let ln = |eps| nn::LayerNormConfig {
            eps,
            ..Default::default()
        };
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        let vision = VisionTower {
            class_embedding: (&vp / "embeddings").var(
                "class_embedding",
                &[v.hidden_size],
                std((v.hidden_size as f64).powf(-0.5)),
            ),
            patch_embedding: nn::conv2d(
                &vp / "embeddings" / "patch_embedding",
                3,
                v.hidden_size,
                v.patch_size,
                nn::ConvConfig {
                    stride: v.patch_size,
                    bias: false,
                    ..Default::default()
                },
            ),
            position_embedding: (&vp / "embeddings" / "position_embedding").var(
                "weight",
                &[grid * grid + 1, v.hidden_size],
                std(0.02),
            ),
            pre_ln: nn::layer_norm(
                &vp / "pre_layrnorm",
                vec![v.hidden_size],
                ln(v.layer_norm_eps),
            ),
            layers: encoder(
                &vp / "encoder",
                v.num_hidden_layers,
                v.hidden_size,
                v.intermediate_size,
                v.num_attention_heads,
                v.layer_norm_eps,
                &v.hidden_act,
            ),
            post_ln: nn::layer_norm(
                &vp / "post_layernorm",
                vec![v.hidden_size],
                ln(v.layer_norm_eps),
            ),
            projection: nn::linear(
                root / "visual_projection",
                v.hidden_size,
                config.projection_dim,
                no_bias,
            ),
        };
        let tp = root / "text_model";
        let text = TextTower {
            token_embedding: nn::embedding(
                &tp / "embeddings" / "token_embedding",
                t.vocab_size,
                t.hidden_size,
                nn::EmbeddingConfig {
                    ws_init: std(0.02),
                    ..Default::default()
                },
            ),
            position_embedding: (&tp / "embeddings" / "position_embedding").var(
                "weight",
                &[t.max_position_embeddings, t.hidden_size],
                std(0.01),
            ),
            layers: encoder(
                &tp / "encoder",
                t.num_hidden_layers,
                t.hidden_size,
                t.intermediate_size,
                t.num_attention_heads,
                t.layer_norm_eps,
                &t.hidden_act,
            ),
            final_ln: nn::layer_norm(
                &tp / "final_layer_norm",
                vec![t.hidden_size],
                ln(t.layer_norm_eps),
            ),
            projection: nn::linear(
                root / "text_projection",
                t.hidden_size,
                config.projection_dim,
                no_bias,
            ),
        };
        let logit_scale = root.var(
            "logit_scale",
            &[],
            nn::Init::Const(config.logit_scale_init_value),
        );
        Clip {
            config: config.clone(),
            vision,
            text,
            logit_scale,
        }
    }

    /// Projected image embeddings (not normalised) of `[batch, 3, S, S]` pixels.
    pub fn image_features(&self, pixels: &Tensor) -> Tensor {
        let v = &self.vision;
        let x = pixels
            .apply(&v.patch_embedding)
            .flatten(2, 3)
            .transpose(1, 2); // [b, grid², d]
        let b = x.size()[0];
        let cls = v
            .class_embedding
            .view([1, 1, -1])
            .expand([b, 1, -1], false)
            .to_kind(x.kind());
        let mut x = Tensor::cat(&[cls, x], 1) + &v.position_embedding;
        x = v.pre_ln.forward(&x);
        for layer in &v.layers {
            x = layer.forward(&x, false);
        }
        let pooled = v.post_ln.forward(&x.select(1, 0));
        v.projection.forward(&pooled)
    }

    /// Projected text embeddings (not normalised) of `[batch, seq]` ids; pooled at the end token
    /// (the largest id, as OpenAI's `argmax`).
    pub fn text_features(&self, ids: &Tensor) -> Tensor {
        let t = &self.text;
        let n = ids.size()[1];
        let mut x = t.token_embedding.forward(ids) + t.position_embedding.narrow(0, 0, n);
        for layer in &t.layers {
            x = layer.forward(&x, true);
        }
        let x = t.final_ln.forward(&x);
        let eos = ids.argmax(-1, false);
        let rows = Tensor::arange(ids.size()[0], (Kind::Int64, ids.device()));
        let pooled = x.index(&[Some(rows), Some(eos)]);
        t.projection.forward(&pooled)
    }

    /// `logits_per_image` `[images, texts]` = exp(logit_scale) x cosine.
    pub fn logits(&self, image_features: &Tensor, text_features: &Tensor) -> Tensor {
        let i = normalize(image_features);
        let t = normalize(text_features);
        i.matmul(&t.tr()) * self.logit_scale.exp()
    }
}

pub fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true)
}

/// Parameter names that HF checkpoints may carry but that are buffers, not weights.
pub fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids")
}
