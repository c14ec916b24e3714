//! Zero-shot scoring with the tch model: prompts -> token ids -> label embeddings, top-1 of a set,
//! and CLIP's contrastive loss. Used by training, export and `predict`.

use runtime::image::preprocess::PreprocessConfig;
use runtime::text::labels::Label;
use runtime::text::tokenizer::{ClipTokenizer, Padding};
use tch::{Device, Kind, Tensor};

use crate::data::ImageSet;
use crate::error::{Error, Result};
use crate::model::{normalize, Clip};

/// Token ids `[labels, len]` of every label in one template.
/// Refuses (instead of libtorch panicking) token ids the model has no embedding for.
pub fn label_tokens(
    tokenizer: &ClipTokenizer,
    labels: &[Label],
    template: &str,
    text: &crate::model::TextConfig,
    device: Device,
) -> Result<Tensor> {
    let prompts: Vec<String> = labels
        .iter()
        .map(|l| runtime::text::prompts::fill(template, l))
        .collect::<runtime::Result<_>>()?;
    let b = tokenizer.encode_batch(&prompts, Padding::Longest)?;
    let top = b.ids.iter().copied().max().unwrap_or(0);
    if top >= text.vocab_size || b.len as i64 > text.max_position_embeddings {
        return Err(Error::TokenizerMismatch {
            max_id: top,
            tokens: b.len,
            vocab: text.vocab_size,
            positions: text.max_position_embeddings,
        });
    }
    Ok(Tensor::from_slice(&b.ids)
        .view([b.batch as i64, b.len as i64])
        .to_device(device))
}

/// [`label_tokens`] of every template, in order (what [`label_embeddings`] averages).
pub fn template_tokens(
    tokenizer: &ClipTokenizer,
    labels: &[Label],
    templates: &[String],
    text: &crate::model::TextConfig,
    device: Device,
) -> Result<Vec<Tensor>> {
    templates
        .iter()
        .map(|t| label_tokens(tokenizer, labels, t, text, device))
        .collect()
}

/// Normalised label embeddings `[labels, D]`, templates averaged after normalising.
pub fn label_embeddings(model: &Clip, per_template: &[Tensor]) -> Tensor {
    tch::no_grad(|| {
        let sum = per_template
            .iter()
            .map(|ids| normalize(&model.text_features(ids)))
            .reduce(|a, b| a + b)
            .expect("a template");
        normalize(&sum)
    })
}

/// Zero-shot top-1 on a set: a hit when the best label is any of the image's labels.
pub fn evaluate(
    model: &Clip,
    set: &ImageSet,
    label_emb: &Tensor,
    cfg: &PreprocessConfig,
    device: Device,
) -> Result<(f64, Vec<usize>)> {
    let mut predictions = Vec::with_capacity(set.len());
    tch::no_grad(|| {
        let idx: Vec<usize> = (0..set.len()).collect();
        for chunk in idx.chunks(64) {
            let img = normalize(
                &model
                    .image_features(&set.pixels(chunk, cfg, device))
                    .to_kind(Kind::Float),
            );
            let best = img
                .matmul(&label_emb.to_kind(Kind::Float).tr())
                .argmax(-1, false)
                .to_device(Device::Cpu);
            let best: Vec<i64> = Vec::<i64>::try_from(best).map_err(Error::Torch)?;
            predictions.extend(best.into_iter().map(|b| b as usize));
        }
        Ok::<(), Error>(())
    })?;
    let hits = predictions
        .iter()
        .zip(&set.all_labels)
        .filter(|(p, l)| l.contains(p))
        .count();
    Ok((hits as f64 / set.len() as f64, predictions))
}
