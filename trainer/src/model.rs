//! OpenAI's CLIP in tch, one configurable implementation. Parameter names follow HF transformers'
//! `CLIPModel`, so `model.safetensors` of `openai/clip-vit-base-patch32` loads as it is.

use runtime::image::preprocess::{Crop, PreprocessConfig};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// The largest input side accepted: CLIPs use 336 px at most; far larger sizes would only make
/// unbounded allocations.
pub const MAX_IMAGE_SIZE: i64 = 2048;

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
    /// Set: OpenAI CLIP's ModifiedResNet image tower (the RN50 family) with these bottleneck blocks
    /// per stage, `hidden_size` the stem width (64 for RN50) and `num_attention_heads` the heads of
    /// its attention pooling; `patch_size` and `intermediate_size` are unused. Absent: a ViT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resnet_layers: Option<Vec<i64>>,
    /// Test-time flip averaging: in inference the embedding is the mean of the L2-normalised
    /// embeddings of the image and its left-right mirror (both in one batch). Not HF's; the
    /// exported graph does the same, so a bundle needs nothing else to know of it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub test_time_flip: bool,
    /// What the preprocessing keeps of a non-square image: the centre square (CLIP's) or the
    /// whole image resized to the square. Not HF's; the bundle's manifest carries it.
    #[serde(skip_serializing_if = "is_center")]
    pub crop: Crop,
}

fn is_center(c: &Crop) -> bool {
    *c == Crop::Center
}

impl VisionConfig {
    /// The preprocessing this tower was trained with: the bundle's and the trainer's, one rule.
    pub fn preprocessing(&self) -> PreprocessConfig {
        let s = self.image_size as u32;
        PreprocessConfig {
            image_size: s,
            resize_shortest_edge: s,
            crop: self.crop,
            ..PreprocessConfig::default()
        }
    }
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
            resnet_layers: None,
            test_time_flip: false,
            crop: Crop::Center,
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
    /// The names [`ClipConfig::preset`] knows (each also has its OpenAI spelling, e.g. `ViT-B/32`).
    pub const PRESETS: &[&str] = &[
        "vit-b-32", "vit-b-16", "vit-l-14", "rn50", "small", "rn-small", "tiny", "rn-tiny",
    ];

    /// `vit-b-32` (default), `vit-b-16`, `vit-l-14`, `rn50` (OpenAI's ResNet-50 CLIP), `tiny`
    /// (tests), `small` (the demo bundle), `rn-small` (a 1.7 M-parameter ResNet tower at 128 px,
    /// the UNIFESP recipe from random weights), `rn-tiny` (tests).
    pub fn preset(name: &str) -> Option<ClipConfig> {
        let mut c = ClipConfig::default();
        let small_text = TextConfig {
            hidden_size: 128,
            intermediate_size: 512,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            ..TextConfig::default()
        };
        let tiny_text = TextConfig {
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            ..TextConfig::default()
        };
        match name {
            "vit-b-32" | "ViT-B/32" => {}
            "rn50" | "RN50" => {
                c.vision_config = VisionConfig {
                    hidden_size: 64,
                    num_attention_heads: 32,
                    resnet_layers: Some(vec![3, 4, 6, 3]),
                    ..VisionConfig::default()
                };
                c.projection_dim = 1024;
            }
            "rn-small" => {
                c.vision_config = VisionConfig {
                    image_size: 128,
                    hidden_size: 16,
                    num_attention_heads: 8,
                    resnet_layers: Some(vec![2, 2, 2, 2]),
                    ..VisionConfig::default()
                };
                c.text_config = small_text;
                c.projection_dim = 128;
            }
            "rn-tiny" => {
                c.vision_config = VisionConfig {
                    image_size: 64,
                    hidden_size: 8,
                    num_attention_heads: 4,
                    resnet_layers: Some(vec![1, 1, 1, 1]),
                    ..VisionConfig::default()
                };
                c.text_config = tiny_text.clone();
                c.projection_dim = 16;
            }
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
                c.text_config = tiny_text.clone();
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
                c.text_config = small_text;
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
        if v.image_size > MAX_IMAGE_SIZE {
            return Err(format!(
                "image size {} is over {MAX_IMAGE_SIZE} pixels",
                v.image_size
            ));
        }
        if let Some(layers) = &v.resnet_layers {
            if layers.len() != 4 || layers.iter().any(|&n| n <= 0) {
                return Err("resnet_layers must be four positive block counts".into());
            }
            if v.image_size % 32 != 0 {
                return Err(format!(
                    "image size {} of a ResNet tower is not a multiple of 32",
                    v.image_size
                ));
            }
            if v.hidden_size % 2 != 0 || (v.hidden_size * 32) % v.num_attention_heads != 0 {
                return Err(format!(
                    "ResNet width {} does not fit {} attention-pool heads",
                    v.hidden_size, v.num_attention_heads
                ));
            }
        } else if v.image_size % v.patch_size != 0 {
            return Err(format!(
                "image size {} is not a multiple of patch size {}",
                v.image_size, v.patch_size
            ));
        }
        if (v.resnet_layers.is_none() && v.hidden_size % v.num_attention_heads != 0)
            || t.hidden_size % t.num_attention_heads != 0
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

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        cin,
        cout,
        k,
        nn::ConvConfig {
            stride,
            padding: k / 2,
            bias: false,
            ..Default::default()
        },
    )
}

fn batch_norm(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, Default::default())
}

/// OpenAI's ResNet bottleneck: all convolutions stride 1, an average pool before the third when
/// the block downsamples (anti-aliased strided convolution), and an avgpool-conv-bn shortcut.
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv3: nn::Conv2D,
    bn3: nn::BatchNorm,
    stride: i64,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl Bottleneck {
    fn new(p: nn::Path, inplanes: i64, planes: i64, stride: i64) -> Bottleneck {
        // Zero-initialised last norm: each residual block starts as the identity (as CLIP's init).
        let bn3 = nn::batch_norm2d(
            &p / "bn3",
            planes * 4,
            nn::BatchNormConfig {
                ws_init: nn::Init::Const(0.0),
                ..Default::default()
            },
        );
        Bottleneck {
            conv1: conv(&p / "conv1", inplanes, planes, 1, 1),
            bn1: batch_norm(&p / "bn1", planes),
            conv2: conv(&p / "conv2", planes, planes, 3, 1),
            bn2: batch_norm(&p / "bn2", planes),
            conv3: conv(&p / "conv3", planes, planes * 4, 1, 1),
            bn3,
            stride,
            downsample: (stride > 1 || inplanes != planes * 4).then(|| {
                (
                    conv(&p / "downsample" / "0", inplanes, planes * 4, 1, 1),
                    batch_norm(&p / "downsample" / "1", planes * 4),
                )
            }),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let s = self.stride;
        let pool = |t: Tensor| {
            if s > 1 {
                t.avg_pool2d([s, s], [s, s], [0, 0], false, true, None::<i64>)
            } else {
                t
            }
        };
        let out = x.apply(&self.conv1).apply_t(&self.bn1, train).relu();
        let out = out.apply(&self.conv2).apply_t(&self.bn2, train).relu();
        let out = pool(out).apply(&self.conv3).apply_t(&self.bn3, train);
        let identity = match &self.downsample {
            Some((c, bn)) => pool(x.shallow_clone()).apply(c).apply_t(bn, train),
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

/// OpenAI CLIP's `AttentionPool2d`: the mean token prepended, positional embeddings added, one
/// multi-head attention whose query is the mean token; `c_proj` is the image projection.
struct AttentionPool {
    positional_embedding: Tensor,
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    c: nn::Linear,
    heads: i64,
}

/// OpenAI CLIP's `ModifiedResNet` (parameter names as OpenAI's and open_clip's `visual.*`).
pub struct ResNetTower {
    stem: Vec<(nn::Conv2D, nn::BatchNorm)>,
    stages: Vec<Vec<Bottleneck>>,
    pool: AttentionPool,
}

impl ResNetTower {
    fn new(p: nn::Path, v: &VisionConfig, layers: &[i64], output_dim: i64) -> ResNetTower {
        let w = v.hidden_size;
        let stem = vec![
            (
                conv(&p / "conv1", 3, w / 2, 3, 2),
                batch_norm(&p / "bn1", w / 2),
            ),
            (
                conv(&p / "conv2", w / 2, w / 2, 3, 1),
                batch_norm(&p / "bn2", w / 2),
            ),
            (
                conv(&p / "conv3", w / 2, w, 3, 1),
                batch_norm(&p / "bn3", w),
            ),
        ];
        let mut inplanes = w;
        let stages = layers
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let planes = w << i;
                let sp = &p / format!("layer{}", i + 1);
                (0..n)
                    .map(|j| {
                        let stride = if i > 0 && j == 0 { 2 } else { 1 };
                        let b = Bottleneck::new(&sp / j, inplanes, planes, stride);
                        inplanes = planes * 4;
                        b
                    })
                    .collect()
            })
            .collect();
        let dim = w * 32;
        let grid = v.image_size / 32;
        let ap = &p / "attnpool";
        let std = (dim as f64).powf(-0.5);
        let init = nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
            ..Default::default()
        };
        let pool = AttentionPool {
            positional_embedding: ap.var(
                "positional_embedding",
                &[grid * grid + 1, dim],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            ),
            q: nn::linear(&ap / "q_proj", dim, dim, init),
            k: nn::linear(&ap / "k_proj", dim, dim, init),
            v: nn::linear(&ap / "v_proj", dim, dim, init),
            c: nn::linear(&ap / "c_proj", dim, output_dim, init),
            heads: v.num_attention_heads,
        };
        ResNetTower { stem, stages, pool }
    }

    fn forward_t(&self, pixels: &Tensor, train: bool) -> Tensor {
        // Channels-last strides make libtorch's CPU convolutions (oneDNN) run in NHWC, which the
        // rest of the tower inherits: faster for these narrow layers than NCHW.
        let mut x = pixels
            .permute([0, 2, 3, 1])
            .contiguous()
            .permute([0, 3, 1, 2]);
        for (c, bn) in &self.stem {
            x = x.apply(c).apply_t(bn, train).relu();
        }
        x = x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
        for stage in &self.stages {
            for block in stage {
                x = block.forward_t(&x, train);
            }
        }
        let p = &self.pool;
        let (b, c) = (x.size()[0], x.size()[1]);
        let x = x.flatten(2, 3).transpose(1, 2); // [b, hw, c]
        let kind = x.kind();
        let x = Tensor::cat(&[x.mean_dim([1i64].as_slice(), true, None), x], 1)
            + p.positional_embedding.to_kind(kind);
        let hd = c / p.heads;
        let q = x
            .narrow(1, 0, 1)
            .apply(&p.q)
            .view([b, 1, p.heads, hd])
            .transpose(1, 2);
        let split = |t: Tensor| t.view([b, -1, p.heads, hd]).transpose(1, 2);
        let (k, v) = (split(x.apply(&p.k)), split(x.apply(&p.v)));
        let y = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, false, None, false,
        );
        y.transpose(1, 2).reshape([b, c]).apply(&p.c)
    }
}

/// The image tower: a ViT (HF names, `vision_model.*`) or a ModifiedResNet (`visual.*`).
pub enum ImageTower {
    Vit(Box<VisionTower>),
    ResNet(ResNetTower),
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
    pub vision: ImageTower,
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
        let vision = if let Some(layers) = &v.resnet_layers {
            ImageTower::ResNet(ResNetTower::new(
                root / "visual",
                v,
                layers,
                config.projection_dim,
            ))
        } else {
            ImageTower::Vit(Box::new(VisionTower {
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
            }))
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

    /// Projected image embeddings (not normalised) of `[batch, 3, S, S]` pixels, in inference mode.
    pub fn image_features(&self, pixels: &Tensor) -> Tensor {
        self.image_features_t(pixels, false)
    }

    /// As [`image_features`](Self::image_features); `train` makes batch norms use and update batch
    /// statistics (ResNet towers; a ViT has none). In inference with `test_time_flip`, the mean of
    /// the normalised embeddings of the image and its mirror.
    pub fn image_features_t(&self, pixels: &Tensor, train: bool) -> Tensor {
        if train || !self.config.vision_config.test_time_flip {
            return self.tower_features(pixels, train);
        }
        let b = pixels.size()[0];
        let both = Tensor::cat(&[pixels.shallow_clone(), pixels.flip([3])], 0);
        let e = normalize(&self.tower_features(&both, false));
        (e.narrow(0, 0, b) + e.narrow(0, b, b)) * 0.5
    }

    /// The image tower and projection on `pixels` as they are.
    fn tower_features(&self, pixels: &Tensor, train: bool) -> Tensor {
        let v = match &self.vision {
            ImageTower::Vit(v) => v,
            ImageTower::ResNet(r) => return r.forward_t(pixels, train),
        };
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

/// L2-normalises the last dimension; a zero vector stays zero (as `runtime::scoring::normalize_rows`),
/// never NaN.
pub fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// Parameter names that HF and open_clip checkpoints may carry but that are buffers, not weights.
pub fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids") || name.ends_with("num_batches_tracked")
}

/// Batch-norm running statistics: state, not trained.
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// Whether a variable belongs to the image side (tower and projection).
pub fn is_vision_variable(name: &str) -> bool {
    name.starts_with("vision_model.")
        || name.starts_with("visual_projection.")
        || name.starts_with("visual.")
}

/// The text encoder's token table (`--freeze-token-embedding`).
pub fn is_token_embedding(name: &str) -> bool {
    name == "text_model.embeddings.token_embedding.weight"
}

#[cfg(test)]
mod tests {
    use super::ClipConfig;

    #[test]
    fn every_listed_preset_exists_and_no_other() {
        for name in ClipConfig::PRESETS {
            assert!(ClipConfig::preset(name).is_some(), "{name}");
        }
        assert!(ClipConfig::preset("vit-b-64").is_none());
    }
}
