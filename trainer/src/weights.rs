//! Weight import and checkpoints.
//!
//! - HF model folders (`config.json` + `model.safetensors`): names match the model's as they are.
//! - OpenAI TorchScript archives (`ViT-B-32.pt`): read with libtorch's module loader, renamed and
//!   reshaped to HF's layout (fused q/k/v split, projections transposed).
//! - Checkpoints: a folder with `config.json` and `model.safetensors` (HF layout), written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::{is_ignored_buffer, ClipConfig};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";

/// Copies `tensors` into the variables of `vs`; every variable must be given with its shape, and no
/// tensor may be left over (HF's `position_ids` buffers excepted).
pub fn assign(vs: &nn::VarStore, tensors: Vec<(String, Tensor)>, source: &Path) -> Result<()> {
    let mut given: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in tensors {
        if !is_ignored_buffer(&name) {
            given.insert(name, t);
        }
    }
    let vars = vs.variables();
    let mut problems = Vec::new();
    let mut missing: Vec<&String> = vars.keys().filter(|k| !given.contains_key(*k)).collect();
    missing.sort();
    if !missing.is_empty() {
        problems.push(format!("missing {}", list(&missing)));
    }
    let mut extra: Vec<&String> = given.keys().filter(|k| !vars.contains_key(*k)).collect();
    extra.sort();
    if !extra.is_empty() {
        problems.push(format!("unexpected {}", list(&extra)));
    }
    let mut shapes: Vec<String> = vars
        .iter()
        .filter_map(|(k, v)| {
            let t = given.get(k)?;
            (t.size() != v.size())
                .then(|| format!("{k} is {:?}, model wants {:?}", t.size(), v.size()))
        })
        .collect();
    shapes.sort();
    if !shapes.is_empty() {
        let n = shapes.len();
        let mut text = format!(
            "{n} mis-shaped: {}",
            shapes
                .iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        if n > 8 {
            text.push_str(&format!(" and {} more", n - 8));
        }
        problems.push(text);
    }
    if !problems.is_empty() {
        return Err(Error::WeightMismatch {
            path: source.to_path_buf(),
            problems,
        });
    }
    tch::no_grad(|| {
        for (k, mut v) in vars {
            let src = &given[&k];
            v.copy_(&src.to_kind(v.kind()).to_device(v.device()));
        }
    });
    Ok(())
}

fn list(names: &[&String]) -> String {
    const SHOWN: usize = 8;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    format!("{} tensor(s): {s}", names.len())
}

pub fn read_config(path: &Path) -> Result<ClipConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let cfg: ClipConfig = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("not a CLIP config.json: {e}"),
    })?;
    cfg.validate().map_err(|reason| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(cfg)
}

/// Tensors of an HF folder or a checkpoint folder (`model.safetensors`), or a `.safetensors` file.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = if path.is_dir() {
        path.join(WEIGHTS)
    } else {
        path.to_path_buf()
    };
    if !file.exists() {
        return Err(Error::Checkpoint {
            path: file,
            reason: "no such file".into(),
        });
    }
    Tensor::read_safetensors(&file).map_err(|e| Error::Checkpoint {
        path: file.clone(),
        reason: format!("not a safetensors file: {e}"),
    })
}

/// Reads OpenAI's TorchScript archive and returns its tensors under HF names, with the
/// configuration inferred from the shapes (as OpenAI's `build_model` does). ViT archives only:
/// TorchScript keeps a ResNet's batch-norm statistics out of its parameters (use open_clip's
/// safetensors file of the same weights).
pub fn read_openai_torchscript(path: &Path) -> Result<(ClipConfig, Vec<(String, Tensor)>)> {
    let module =
        tch::CModule::load_on_device(path, Device::Cpu).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not a TorchScript archive: {e}"),
        })?;
    let mut sd: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in module.named_parameters().map_err(Error::Torch)? {
        sd.insert(name, t.to_kind(Kind::Float));
    }
    if sd.contains_key("visual.layer1.0.conv1.weight") {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason:
                "a ResNet CLIP archive: TorchScript does not expose its batch-norm statistics; \
                     import open_clip's safetensors file of the same weights instead \
                     (e.g. open_clip_model.safetensors of timm/resnet50_clip.openai)"
                    .into(),
        });
    }
    from_openai_state_dict(sd, path)
}

/// Reads an open_clip `state_dict` saved as safetensors (`open_clip_model.safetensors`; OpenAI's
/// names: `visual.*`, `transformer.*`, `token_embedding.weight`, ...), ViT or ModifiedResNet.
pub fn read_open_clip_safetensors(path: &Path) -> Result<(ClipConfig, Vec<(String, Tensor)>)> {
    let sd: BTreeMap<String, Tensor> = read_safetensors(path)?
        .into_iter()
        .map(|(k, t)| (k, t.to_kind(Kind::Float)))
        .collect();
    from_openai_state_dict(sd, path)
}

/// Tensor `key` of an OpenAI-named state dict, or an error naming it and the file.
fn tensor(sd: &BTreeMap<String, Tensor>, key: &str, path: &Path) -> Result<Tensor> {
    sd.get(key)
        .map(|t| t.shallow_clone())
        .ok_or_else(|| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("no tensor {key} (not an OpenAI CLIP state dict?)"),
        })
}

/// OpenAI-named tensors -> (config, tensors under this crate's names): HF names for the text
/// tower and a ViT, `visual.*` kept for a ModifiedResNet.
fn from_openai_state_dict(
    sd: BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<(ClipConfig, Vec<(String, Tensor)>)> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let get = |sd: &BTreeMap<String, Tensor>, k: &str| tensor(sd, k, path);
    if sd.contains_key("visual.layer1.0.conv1.weight") {
        return from_openai_resnet(sd, path);
    }
    let conv = get(&sd, "visual.conv1.weight")?;
    let vision_width = conv.size()[0];
    let patch = conv.size()[2];
    let vision_layers = sd
        .keys()
        .filter(|k| {
            k.starts_with("visual.transformer.resblocks.") && k.ends_with(".attn.in_proj_weight")
        })
        .count() as i64;
    if vision_layers == 0 {
        return Err(bad("no visual transformer or ResNet blocks".into()));
    }
    let grid = ((get(&sd, "visual.positional_embedding")?.size()[0] - 1) as f64)
        .sqrt()
        .round() as i64;
    let (text, mut out) = openai_text(&sd, path)?;
    let mut cfg = ClipConfig::default();
    cfg.vision_config.hidden_size = vision_width;
    cfg.vision_config.intermediate_size = vision_width * 4;
    cfg.vision_config.num_hidden_layers = vision_layers;
    cfg.vision_config.num_attention_heads = vision_width / 64;
    cfg.vision_config.patch_size = patch;
    cfg.vision_config.image_size = patch * grid;
    set_text_config(&mut cfg, &text);
    cfg.validate().map_err(bad)?;

    out.extend(transformer_blocks(
        &sd,
        "visual.transformer",
        "vision_model",
        vision_layers,
        path,
    )?);
    out.push((
        "vision_model.embeddings.class_embedding".into(),
        get(&sd, "visual.class_embedding")?,
    ));
    out.push((
        "vision_model.embeddings.patch_embedding.weight".into(),
        conv,
    ));
    out.push((
        "vision_model.embeddings.position_embedding.weight".into(),
        get(&sd, "visual.positional_embedding")?,
    ));
    for (from, to) in [
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
    ] {
        for p in ["weight", "bias"] {
            out.push((format!("{to}.{p}"), get(&sd, &format!("{from}.{p}"))?));
        }
    }
    out.push((
        "visual_projection.weight".into(),
        get(&sd, "visual.proj")?.tr().contiguous(),
    ));
    Ok((cfg, out))
}

/// The text side of OpenAI-named tensors: (width, layers, heads, context, vocabulary, embedding
/// dim) and the tensors under HF names.
fn openai_text(
    sd: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<(TextShape, Vec<(String, Tensor)>)> {
    let get = |k: &str| tensor(sd, k, path);
    let width = get("ln_final.weight")?.size()[0];
    let layers = sd
        .keys()
        .filter(|k| k.starts_with("transformer.resblocks.") && k.ends_with(".attn.in_proj_weight"))
        .count() as i64;
    let shape = TextShape {
        width,
        layers,
        context: get("positional_embedding")?.size()[0],
        vocab: get("token_embedding.weight")?.size()[0],
        embed_dim: get("text_projection")?.size()[1],
    };
    let mut out = transformer_blocks(sd, "transformer", "text_model", layers, path)?;
    for p in ["weight", "bias"] {
        out.push((
            format!("text_model.final_layer_norm.{p}"),
            get(&format!("ln_final.{p}"))?,
        ));
    }
    out.push((
        "text_projection.weight".into(),
        get("text_projection")?.tr().contiguous(),
    ));
    out.push((
        "text_model.embeddings.token_embedding.weight".into(),
        get("token_embedding.weight")?,
    ));
    out.push((
        "text_model.embeddings.position_embedding.weight".into(),
        get("positional_embedding")?,
    ));
    out.push(("logit_scale".into(), get("logit_scale")?));
    Ok((shape, out))
}

/// OpenAI's residual attention blocks `{src}.resblocks.i` (fused q/k/v) under HF names
/// `{dst}.encoder.layers.i`.
fn transformer_blocks(
    sd: &BTreeMap<String, Tensor>,
    src: &str,
    dst: &str,
    n: i64,
    path: &Path,
) -> Result<Vec<(String, Tensor)>> {
    let get = |k: &str| tensor(sd, k, path);
    let mut out = Vec::new();
    for i in 0..n {
        let s = format!("{src}.resblocks.{i}");
        let d = format!("{dst}.encoder.layers.{i}");
        let w = get(&format!("{s}.attn.in_proj_weight"))?.chunk(3, 0);
        let b = get(&format!("{s}.attn.in_proj_bias"))?.chunk(3, 0);
        for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            out.push((format!("{d}.self_attn.{name}.weight"), w[j].shallow_clone()));
            out.push((format!("{d}.self_attn.{name}.bias"), b[j].shallow_clone()));
        }
        for (from, to) in [
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
            ("ln_2", "layer_norm2"),
        ] {
            for p in ["weight", "bias"] {
                out.push((format!("{d}.{to}.{p}"), get(&format!("{s}.{from}.{p}"))?));
            }
        }
    }
    Ok(out)
}

/// The text tower's configuration as OpenAI's `build_model` infers it (heads = width / 64).
fn set_text_config(cfg: &mut ClipConfig, text: &TextShape) {
    cfg.text_config.hidden_size = text.width;
    cfg.text_config.intermediate_size = text.width * 4;
    cfg.text_config.num_hidden_layers = text.layers;
    cfg.text_config.num_attention_heads = (text.width / 64).max(1);
    cfg.text_config.max_position_embeddings = text.context;
    cfg.text_config.vocab_size = text.vocab;
    cfg.projection_dim = text.embed_dim;
}

struct TextShape {
    width: i64,
    layers: i64,
    context: i64,
    vocab: i64,
    embed_dim: i64,
}

/// An OpenAI/open_clip ModifiedResNet CLIP (RN50, RN101, RN50x4, ...): configuration as OpenAI's
/// `build_model` infers it; the `visual.*` tensors keep their names (batch-norm statistics
/// included, `num_batches_tracked` dropped).
fn from_openai_resnet(
    sd: BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<(ClipConfig, Vec<(String, Tensor)>)> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let (text, mut out) = openai_text(&sd, path)?;
    let width = sd["visual.layer1.0.conv1.weight"].size()[0];
    let layers: Vec<i64> = (1..=4)
        .map(|l| {
            let prefix = format!("visual.layer{l}.");
            let blocks: std::collections::BTreeSet<&str> = sd
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix)?.split('.').next())
                .collect();
            blocks.len() as i64
        })
        .collect();
    let pos = tensor(&sd, "visual.attnpool.positional_embedding", path)?;
    let grid = ((pos.size()[0] - 1) as f64).sqrt().round() as i64;
    let mut cfg = ClipConfig {
        vision_config: crate::model::VisionConfig {
            image_size: grid * 32,
            hidden_size: width,
            // OpenAI: vision_heads = vision_width * 32 // 64
            num_attention_heads: (width * 32 / 64).max(1),
            resnet_layers: Some(layers),
            ..Default::default()
        },
        ..Default::default()
    };
    set_text_config(&mut cfg, &text);
    cfg.validate().map_err(bad)?;
    for (k, t) in sd {
        if k.starts_with("visual.") && !is_ignored_buffer(&k) {
            out.push((k, t));
        }
    }
    Ok((cfg, out))
}

/// Writes a checkpoint folder atomically: `config.json`, `model.safetensors`, and whatever
/// `write_extra` puts into the staging folder it is given (optimizer state, tokenizer, ...); the
/// staging folder is then renamed over the target.
pub fn save_checkpoint(
    dir: &Path,
    config: &ClipConfig,
    vs: &nn::VarStore,
    write_extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    // Built beside the target and renamed into place (runtime's StagedDir; removed on error).
    let staged = runtime::fs::StagedDir::new(dir)?;
    let staging = staged.path();
    let json = serde_json::to_vec_pretty(config).expect("config serialises");
    runtime::fs::write_atomic(&staging.join(CONFIG), &json)?;
    vs.save(staging.join(WEIGHTS)).map_err(Error::Torch)?;
    sync_file(&staging.join(WEIGHTS))?;
    write_extra(staging)?;
    staged.commit()?;
    Ok(())
}

/// A checkpoint folder for a path a user hands over: a checkpoint itself, or a training run
/// folder (`run.json`), which means the run's selected checkpoint (its `best.json`).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(CONFIG).is_file() || !runtime::fs::OutputKind::Run.is_in(path) {
        return Ok(path.to_path_buf());
    }
    let best = path.join("best.json");
    let text = std::fs::read(&best).map_err(|e| Error::io(&best, e))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::Checkpoint {
            path: best.clone(),
            reason: e.to_string(),
        })?;
    let Some(rel) = value["checkpoint"]
        .as_str()
        .filter(|r| runtime::fs::is_contained(r))
    else {
        return Err(Error::Checkpoint {
            path: best,
            reason: "names no checkpoint of the run (a run of several learning rates: pick one of its lr-* folders)".into(),
        });
    };
    let dir = path.join(rel);
    eprintln!("using the run's selected checkpoint {}", dir.display());
    Ok(dir)
}

/// The configuration of a checkpoint / HF folder (an error naming it when it is not one).
pub fn checkpoint_config(dir: &Path) -> Result<ClipConfig> {
    if !dir.is_dir() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: "not a checkpoint folder (config.json + model.safetensors)".into(),
        });
    }
    if !dir.join(CONFIG).exists() && runtime::fs::OutputKind::Bundle.is_in(dir) {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: "is a model bundle (ONNX), not a checkpoint: training and export start from the checkpoint it was exported from (trainer init makes one)".into(),
        });
    }
    read_config(&dir.join(CONFIG))
}

/// A model loaded from a checkpoint or HF folder.
pub struct Loaded {
    pub vs: nn::VarStore,
    pub model: crate::model::Clip,
    pub source: PathBuf,
}

/// Loads a checkpoint / HF folder onto `device`; a config that does not fit the weights is an error
/// naming the tensors.
pub fn load(dir: &Path, device: Device) -> Result<Loaded> {
    let config = checkpoint_config(dir)?;
    let vs = nn::VarStore::new(device);
    let model = crate::model::Clip::new(&vs.root(), &config);
    assign(&vs, read_safetensors(dir)?, &dir.join(WEIGHTS))?;
    Ok(Loaded {
        vs,
        model,
        source: dir.to_path_buf(),
    })
}

/// Flushes a file written by a library that does not (libtorch's safetensors writer) to the disk.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        runtime::fs::leftovers(dir).expect("listing")
    }

    #[test]
    fn a_bundle_where_a_checkpoint_is_expected_is_named_as_such() {
        let bundle = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
        let err = checkpoint_config(&bundle).expect_err("a bundle is no checkpoint");
        assert!(err.to_string().contains("is a model bundle"), "{err}");
    }

    /// The checkpoint writer fails after `config.json` and `model.safetensors` are staged: the
    /// previous checkpoint stays as it was and no staging folder is left.
    #[test]
    fn a_failure_mid_write_keeps_the_old_checkpoint_and_leaves_no_staging() {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = dir.path().join("epoch-001");
        let config = ClipConfig::preset("tiny").expect("preset");
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = crate::model::Clip::new(&vs.root(), &config);
        save_checkpoint(&target, &config, &vs, |_| Ok(())).expect("first checkpoint");
        let weights_before = std::fs::read(target.join(WEIGHTS)).expect("weights");

        tch::no_grad(|| {
            for (_, mut t) in vs.variables() {
                let _ = t.fill_(0.5);
            }
        });
        let err = save_checkpoint(&target, &config, &vs, |staging| {
            assert!(staging.join(CONFIG).is_file() && staging.join(WEIGHTS).is_file());
            Err(Error::io(
                staging,
                std::io::Error::other("injected failure"),
            ))
        })
        .expect_err("the injected failure must surface");
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(
            std::fs::read(target.join(WEIGHTS)).expect("weights"),
            weights_before
        );
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );

        let fresh = dir.path().join("epoch-002");
        save_checkpoint(&fresh, &config, &vs, |staging| {
            Err(Error::io(
                staging,
                std::io::Error::other("injected failure"),
            ))
        })
        .expect_err("fails");
        assert!(!fresh.exists());
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }
}
