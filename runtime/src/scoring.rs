//! Zero-shot / fine-tuned scoring: cosine of the L2-normalised image embedding with each label
//! embedding, times the logit scale, softmax.

/// Probabilities over labels for one image embedding. `labels` is `[n x dim]`, rows normalised.
pub fn probabilities(image_embedding: &[f32], labels: &[f32], logit_scale: f32) -> Vec<f32> {
    if image_embedding.is_empty() {
        return vec![];
    }
    softmax(&logits(image_embedding, labels, logit_scale))
}

/// `logit_scale` x the cosine of one image embedding with each label embedding (rows normalised).
pub fn logits(image_embedding: &[f32], labels: &[f32], logit_scale: f32) -> Vec<f32> {
    let dim = image_embedding.len();
    if dim == 0 {
        return vec![];
    }
    // Dividing the dot products by the norm (rather than normalising first) is the arithmetic the
    // parity tests and the recorded outputs use; a zero vector gets zero logits, as in
    // [`normalize_rows`].
    let norm = image_embedding
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    labels
        .chunks_exact(dim)
        .map(|l| {
            logit_scale
                * l.iter()
                    .zip(image_embedding)
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
                / norm
        })
        .collect()
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Indices of the `k` largest values, largest first (ties keep label order).
pub fn top_k(probs: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// One JSON line of `classify --json` (and `trainer predict`): the file and its `k` best labels.
pub fn json_line(
    file: &str,
    model: &str,
    labels: &[crate::text::labels::Label],
    probs: &[f32],
    k: usize,
) -> serde_json::Value {
    let entries: Vec<serde_json::Value> = top_k(probs, k)
        .into_iter()
        .map(|i| serde_json::json!({"label": labels[i].name, "id": labels[i].id, "probability": probs[i]}))
        .collect();
    serde_json::json!({"file": file, "model": model, "top": entries})
}

/// Averages normalised embeddings of several templates per label, then normalises again.
/// `per_template` is `[templates][labels x dim]`.
pub fn ensemble(per_template: &[Vec<f32>], dim: usize) -> Vec<f32> {
    let mut acc = vec![0f32; per_template.first().map_or(0, Vec::len)];
    for t in per_template {
        for (a, v) in acc.iter_mut().zip(normalize_rows(t, dim)) {
            *a += v;
        }
    }
    normalize_rows(&acc, dim)
}

/// L2-normalises each row of a row-major matrix (zero rows stay zero).
pub fn normalize_rows(data: &[f32], dim: usize) -> Vec<f32> {
    let mut out = data.to_vec();
    if dim == 0 {
        return out;
    }
    for row in out.chunks_exact_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_match_hand_computation() {
        // Two labels along x and y; the image points along x with norm 2.
        let p = probabilities(&[2.0, 0.0], &[1.0, 0.0, 0.0, 1.0], 100.0);
        let e = (-100f32).exp();
        assert!((p[0] - 1.0 / (1.0 + e)).abs() < 1e-7);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let p = probabilities(&[1.0, 1.0], &[1.0, 0.0, 0.0, 1.0], 1.0);
        assert!((p[0] - 0.5).abs() < 1e-7);
    }

    #[test]
    fn top_k_orders_and_truncates() {
        assert_eq!(top_k(&[0.1, 0.5, 0.2, 0.2], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[0.1], 5), vec![0]);
    }

    #[test]
    fn ensemble_normalises_before_and_after() {
        let a = vec![3.0, 0.0];
        let b = vec![0.0, 0.5];
        let e = ensemble(&[a, b], 2);
        let s = 1.0 / 2f32.sqrt();
        assert!((e[0] - s).abs() < 1e-6 && (e[1] - s).abs() < 1e-6);
    }
}
