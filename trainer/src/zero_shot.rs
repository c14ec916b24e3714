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

/// How a model scores a set against label embeddings.
pub struct SetScores {
    /// A hit when the best label is any of the image's labels.
    pub top1: f64,
    /// Mean negative log-likelihood of the image's labels (of any of them, for several) under the
    /// softmax of the model's logits (its logit scale times the cosines): the training loss
    /// without smoothing, which moves where top-1 on a small set does not.
    pub loss: f64,
    /// The best label of each image, in the set's order.
    pub predictions: Vec<usize>,
}

/// Scores every image of a set (zero-shot: by cosine to the label embeddings).
pub fn evaluate(
    model: &Clip,
    set: &ImageSet,
    label_emb: &Tensor,
    cfg: &PreprocessConfig,
    device: Device,
) -> Result<SetScores> {
    let mut predictions = Vec::with_capacity(set.len());
    let mut loss_sum = 0.0;
    tch::no_grad(|| {
        let scale = model.logit_scale.exp().to_kind(Kind::Float);
        let labels_t = label_emb.to_kind(Kind::Float).tr();
        let idx: Vec<usize> = (0..set.len()).collect();
        for chunk in idx.chunks(64) {
            let img = normalize(
                &model
                    .image_features(&set.pixels(chunk, cfg, device))
                    .to_kind(Kind::Float),
            );
            let logits = img.matmul(&labels_t) * &scale;
            let best = logits.argmax(-1, false).to_device(Device::Cpu);
            let best: Vec<i64> = Vec::<i64>::try_from(best).map_err(Error::Torch)?;
            predictions.extend(best.into_iter().map(|b| b as usize));
            // Log-probabilities on the host, one copy per chunk; a row's labels are combined
            // there (log of the summed probabilities, shifted by their largest: no underflow).
            let log_p = logits.log_softmax(-1, Kind::Double).to_device(Device::Cpu);
            let n_labels = log_p.size()[1] as usize;
            let log_p = Vec::<f64>::try_from(log_p.flatten(0, -1)).map_err(Error::Torch)?;
            for (row, &i) in log_p.chunks_exact(n_labels).zip(chunk) {
                let own = || set.all_labels[i].iter().map(|&l| row[l]);
                let top = own().fold(f64::NEG_INFINITY, f64::max);
                loss_sum -= top + own().map(|v| (v - top).exp()).sum::<f64>().ln();
            }
        }
        Ok::<(), Error>(())
    })?;
    let hits = predictions
        .iter()
        .zip(&set.all_labels)
        .filter(|(p, l)| l.contains(p))
        .count();
    Ok(SetScores {
        top1: hits as f64 / set.len() as f64,
        loss: loss_sum / set.len() as f64,
        predictions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClipConfig;
    use runtime::image::{Image, Pixels};
    use tch::nn;

    /// The loss is the mean NLL of each image's label under softmax(scale x cosine) (of any of
    /// its labels, for several), computed here from the model's own features.
    #[test]
    fn set_loss_is_the_labels_negative_log_likelihood() {
        tch::manual_seed(5);
        let config = ClipConfig::preset("rn-tiny").unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &config);
        let cfg = config.vision_config.preprocessing();
        let s = cfg.image_size;
        let crops: Vec<Image> = (0..3u32)
            .map(|k| Image {
                width: s,
                height: s,
                pixels: Pixels::Gray((0..s * s).map(|i| ((i * (k + 3)) % 251) as u8).collect()),
            })
            .collect();
        let set = ImageSet {
            crops,
            labels: vec![0, 2, 1],
            all_labels: vec![vec![0], vec![2], vec![1, 2]],
            skipped: vec![],
        };
        let label_emb = normalize(&Tensor::randn(
            [3, config.projection_dim],
            (Kind::Float, Device::Cpu),
        ));
        let scores = evaluate(&model, &set, &label_emb, &cfg, Device::Cpu).unwrap();
        let p = tch::no_grad(|| {
            let img = normalize(&model.image_features(&set.pixels(&[0, 1, 2], &cfg, Device::Cpu)));
            (img.matmul(&label_emb.tr()) * model.logit_scale.exp()).softmax(-1, Kind::Double)
        });
        let p = |i: i64, l: i64| p.double_value(&[i, l]);
        let expected = -(p(0, 0).ln() + p(1, 2).ln() + (p(2, 1) + p(2, 2)).ln()) / 3.0;
        assert!(
            (scores.loss - expected).abs() < 1e-5,
            "{} vs {expected}",
            scores.loss
        );
        assert_eq!(scores.predictions.len(), 3);
        let hits = (0..3)
            .filter(|&i| set.all_labels[i].contains(&scores.predictions[i]))
            .count();
        assert_eq!(scores.top1, hits as f64 / 3.0);
    }
}
