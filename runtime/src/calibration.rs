//! Scores a user can trust: temperature scaling (Guo et al. 2017) fitted on held-out labelled
//! images, and an "unknown" rule (a threshold on the cosine to the nearest class centroid, or on
//! the calibrated top-1 probability) chosen for a false-accept rate on out-of-distribution images;
//! with the measures that judge both (negative log-likelihood, expected calibration error,
//! reliability bins, AUROC of the rejection score, accuracy against coverage).

use serde::{Deserialize, Serialize};

/// The score an "unknown" rule thresholds (higher: more like the bundle's labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum RejectScore {
    /// The calibrated top-1 probability: low for an image between two labels, but often high for
    /// one unlike all of them (a softmax has to put its mass somewhere).
    #[default]
    Probability,
    /// The cosine between the image embedding and the nearest class centroid (each label's mean
    /// image embedding over labelled images, the bundle file `class_centroids`): low for an image
    /// unlike every label's images.
    Centroid,
}

impl RejectScore {
    /// The name in results (`"reject_score"`) and reports.
    pub fn name(self) -> &'static str {
        match self {
            RejectScore::Probability => "calibrated top-1 probability",
            RejectScore::Centroid => "cosine to the nearest class centroid",
        }
    }

    /// A few words for the table of `classify`.
    pub fn short_name(self) -> &'static str {
        match self {
            RejectScore::Probability => "probability",
            RejectScore::Centroid => "centroid cosine",
        }
    }
}

/// What a bundle's manifest records under `calibration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Logits are divided by it before the softmax (1: unchanged).
    pub temperature: f32,
    /// Below this score (of `reject_score`) the answer is `unknown`; none: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_below: Option<f32>,
    /// What `reject_below` thresholds (bundles of format 2 before it existed: the probability).
    #[serde(default)]
    pub reject_score: RejectScore,
    /// The figures it was fitted on.
    pub fitted_on: FitReport,
}

/// Where a calibration comes from and what it changed, kept beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// The labelled images the temperature was fitted on (data set, split, count).
    pub data: String,
    pub images: usize,
    pub nll_before: f64,
    pub nll_after: f64,
    pub ece_before: f64,
    pub ece_after: f64,
    /// The out-of-distribution images the threshold was chosen on, and the rule's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject: Option<RejectReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectReport {
    /// The labelled images the class centroids were computed from (centroid rule).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub centroid_data: String,
    #[serde(default)]
    pub centroid_images: usize,
    pub ood_data: String,
    pub ood_images: usize,
    /// The largest share of out-of-distribution images the threshold lets through (asked).
    pub target_false_accept: f64,
    /// The share it lets through on those images (at most the target).
    pub false_accept: f64,
    /// The share of the labelled images it keeps, and their top-1 accuracy.
    pub in_distribution_accepted: f64,
    pub accuracy_accepted: f64,
    /// Area under the ROC curve of the rejection score, in- vs out-of-distribution.
    pub auroc: f64,
}

/// A bundle's "unknown" rule, ready to apply to an image's embedding and probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectRule {
    pub score: RejectScore,
    pub below: f32,
    /// `[labels x dim]`, rows L2-normalised (the centroid rule's; empty otherwise).
    centroids: Vec<f32>,
    dim: usize,
}

impl RejectRule {
    /// A rule on the probability, or on the centroids (`[labels x dim]`, normalised here).
    pub fn new(score: RejectScore, below: f32, centroids: &[f32], dim: usize) -> RejectRule {
        RejectRule {
            score,
            below,
            centroids: crate::scoring::normalize_rows(centroids, dim),
            dim,
        }
    }

    /// The rule's score of one image, from its embedding and calibrated label probabilities.
    pub fn score(&self, embedding: &[f32], probs: &[f32]) -> f32 {
        match self.score {
            RejectScore::Probability => probs.iter().fold(0f32, |m, &p| m.max(p)),
            RejectScore::Centroid => nearest_centroid_cosine(embedding, &self.centroids, self.dim),
        }
    }

    /// Whether the answer is `unknown`, and the score it was decided on.
    pub fn judge(&self, embedding: &[f32], probs: &[f32]) -> (bool, f32) {
        let s = self.score(embedding, probs);
        (self.rejects(s), s)
    }

    /// Whether a score is below the threshold (NaN, from a broken embedding, is too).
    pub fn rejects(&self, score: f32) -> bool {
        score.is_nan() || score < self.below
    }
}

/// With an "unknown" rule (a calibrated bundle's), says in a result line whether the image is
/// unknown (`"unknown"`; the scores stay) and the score it was judged on (`"reject_score"`).
/// Returns the verdict.
pub fn mark_unknown(
    line: &mut serde_json::Value,
    embedding: &[f32],
    probs: &[f32],
    rule: Option<&RejectRule>,
) -> bool {
    let Some(rule) = rule else {
        return false;
    };
    let (unknown, score) = rule.judge(embedding, probs);
    line["unknown"] = unknown.into();
    line["reject_score"] =
        serde_json::Number::from_f64(score as f64).map_or(serde_json::Value::Null, Into::into);
    unknown
}

/// The largest cosine between `embedding` and the rows of `centroids` (normalised, `dim` wide);
/// -1 without centroids.
pub fn nearest_centroid_cosine(embedding: &[f32], centroids: &[f32], dim: usize) -> f32 {
    let norm = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
    if dim == 0 || embedding.len() != dim {
        return -1.0;
    }
    centroids
        .chunks_exact(dim)
        .map(|c| c.iter().zip(embedding).map(|(a, b)| a * b).sum::<f32>() / norm.max(1e-12))
        .fold(-1.0, f32::max)
}

/// Each label's centroid: the normalised mean of the normalised embeddings of its images
/// (`[labels x dim]`); labels without an image are listed in the error.
pub fn class_centroids(
    embeddings: &[Vec<f32>],
    truth: &[usize],
    labels: usize,
    dim: usize,
) -> std::result::Result<Vec<f32>, Vec<usize>> {
    let mut sum = vec![0f32; labels * dim];
    let mut count = vec![0usize; labels];
    for (e, &y) in embeddings.iter().zip(truth) {
        let e = crate::scoring::normalize_rows(e, dim);
        for (s, v) in sum[y * dim..(y + 1) * dim].iter_mut().zip(&e) {
            *s += v;
        }
        count[y] += 1;
    }
    let missing: Vec<usize> = (0..labels).filter(|&l| count[l] == 0).collect();
    if !missing.is_empty() {
        return Err(missing);
    }
    Ok(crate::scoring::normalize_rows(&sum, dim))
}

/// How a calibrated bundle does on evaluated images (`runtime eval`): calibration error and
/// negative log-likelihood without and with its temperature, and its "unknown" rule's effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluated {
    pub temperature: f32,
    pub ece_uncalibrated: f64,
    pub ece_calibrated: f64,
    pub nll_uncalibrated: f64,
    pub nll_calibrated: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_below: Option<f32>,
    pub reject_score: RejectScore,
    /// The share of the images answered (not `unknown`), and the top-1 accuracy on them.
    pub answered: f64,
    pub top1_answered: f64,
    /// Reliability diagram of the calibrated probabilities (15 bins), and of the uncalibrated.
    pub reliability: Vec<ReliabilityBin>,
    pub reliability_uncalibrated: Vec<ReliabilityBin>,
    /// Top-1 accuracy against the share answered, as the threshold on the rejection score moves
    /// (empty without an "unknown" rule).
    pub coverage: Vec<CoveragePoint>,
    /// Out-of-distribution images (`runtime eval --ood`): how the rule does on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood: Option<OodEvaluated>,
}

/// One point of the accuracy-coverage curve: answering the images whose score is at least
/// `threshold` answers `coverage` of them, with this top-1 accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoveragePoint {
    pub threshold: f32,
    pub coverage: f64,
    pub accuracy: f64,
}

/// The "unknown" rule on images that are none of the labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodEvaluated {
    pub data: String,
    pub images: usize,
    pub unreadable: usize,
    /// The share answered `unknown` (the rule's true rejections).
    pub unknown: f64,
    /// Area under the ROC curve of the rejection score, evaluated vs out-of-distribution images.
    pub auroc: f64,
}

/// [`Evaluated`] from the logits (`rows x classes`) of labelled images and their rejection scores
/// (one per row; ignored without a rule).
pub fn evaluate(
    logits: &[f32],
    classes: usize,
    truth: &[usize],
    reject_scores: &[f32],
    calibration: &Calibration,
) -> Evaluated {
    let t = calibration.temperature;
    let raw = softmax_rows(logits, classes, 1.0);
    let calibrated = softmax_rows(logits, classes, t);
    let (answered, top1_answered) = answered(
        &calibrated,
        classes,
        truth,
        reject_scores,
        calibration.reject_below,
    );
    let coverage = if calibration.reject_below.is_some() {
        coverage_curve(&calibrated, classes, truth, reject_scores, 100)
    } else {
        Vec::new()
    };
    Evaluated {
        temperature: t,
        ece_uncalibrated: expected_calibration_error(&raw, classes, truth, 15),
        ece_calibrated: expected_calibration_error(&calibrated, classes, truth, 15),
        nll_uncalibrated: nll(logits, classes, truth, 1.0),
        nll_calibrated: nll(logits, classes, truth, t as f64),
        reject_below: calibration.reject_below,
        reject_score: calibration.reject_score,
        answered,
        top1_answered,
        reliability: reliability(&calibrated, classes, truth, 15),
        reliability_uncalibrated: reliability(&raw, classes, truth, 15),
        coverage,
        ood: None,
    }
}

/// Accuracy against coverage: the images ordered by rejection score, best first; at most
/// `points` points, the last at full coverage.
pub fn coverage_curve(
    probs: &[f32],
    classes: usize,
    truth: &[usize],
    scores: &[f32],
    points: usize,
) -> Vec<CoveragePoint> {
    let right: Vec<bool> = confidences(probs, classes, truth)
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let mut order: Vec<usize> = (0..right.len().min(scores.len())).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let n = order.len();
    let step = n.div_ceil(points.max(1)).max(1);
    let mut out = Vec::new();
    let mut correct = 0usize;
    for (i, &ix) in order.iter().enumerate() {
        correct += right[ix] as usize;
        let kept = i + 1;
        if kept % step == 0 || kept == n {
            out.push(CoveragePoint {
                threshold: scores[ix],
                coverage: kept as f64 / n as f64,
                accuracy: correct as f64 / kept as f64,
            });
        }
    }
    out
}

/// Softmax of `logits / temperature`, row by row (`classes` per row).
pub fn softmax_rows(logits: &[f32], classes: usize, temperature: f32) -> Vec<f32> {
    logits
        .chunks_exact(classes)
        .flat_map(|row| {
            let scaled: Vec<f32> = row.iter().map(|v| v / temperature).collect();
            crate::scoring::softmax(&scaled)
        })
        .collect()
}

/// Mean negative log-likelihood of the true classes at a temperature.
pub fn nll(logits: &[f32], classes: usize, truth: &[usize], temperature: f64) -> f64 {
    let beta = 1.0 / temperature;
    let total: f64 = logits
        .chunks_exact(classes)
        .zip(truth)
        .map(|(row, &y)| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = row
                .iter()
                .map(|&v| (beta * (v as f64 - max)).exp())
                .sum::<f64>()
                .ln()
                + beta * max;
            lse - beta * row[y] as f64
        })
        .sum();
    total / truth.len().max(1) as f64
}

/// The temperature that minimises the mean negative log-likelihood of the true classes. The NLL is
/// convex in the inverse temperature, so Newton's method on it (with a bisection guard) finds the
/// minimum exactly, within [1e-4, 1e4] (a model no better than chance gets the flattest); `None`
/// when there is nothing to fit (no rows, or every row's logits equal).
pub fn fit_temperature(logits: &[f32], classes: usize, truth: &[usize]) -> Option<f32> {
    if truth.is_empty() || classes < 2 || logits.len() != truth.len() * classes {
        return None;
    }
    // d/dbeta and d2/dbeta2 of the mean NLL at beta = 1/T.
    let derivatives = |beta: f64| -> (f64, f64) {
        let (mut g, mut h) = (0.0, 0.0);
        for (row, &y) in logits.chunks_exact(classes).zip(truth) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let w: Vec<f64> = row
                .iter()
                .map(|&v| (beta * (v as f64 - max)).exp())
                .collect();
            let s: f64 = w.iter().sum();
            let mean: f64 = row.iter().zip(&w).map(|(&v, w)| v as f64 * w).sum::<f64>() / s;
            let second: f64 = row
                .iter()
                .zip(&w)
                .map(|(&v, w)| (v as f64).powi(2) * w)
                .sum::<f64>()
                / s;
            g += mean - row[y] as f64;
            h += second - mean * mean;
        }
        let n = truth.len() as f64;
        (g / n, h / n)
    };
    // Rows whose logits are all equal carry no information about the temperature.
    if derivatives(1.0).1 <= 1e-12 {
        return None;
    }
    // The minimum lies where the gradient changes sign; bracket it in beta in [1e-4, 1e4].
    let (mut lo, mut hi) = (1e-4f64, 1e4f64);
    if derivatives(hi).0 <= 0.0 {
        // Still improving at the sharpest temperature: the data is separable; take the bound.
        return Some((1.0 / hi) as f32);
    }
    if derivatives(lo).0 >= 0.0 {
        // The scores are no better than chance: the flattest temperature is the best one.
        return Some((1.0 / lo) as f32);
    }
    let mut beta = 1.0f64.clamp(lo, hi);
    for _ in 0..200 {
        let (g, h) = derivatives(beta);
        if g.abs() < 1e-12 {
            break;
        }
        if g > 0.0 {
            hi = beta;
        } else {
            lo = beta;
        }
        if (hi - lo) / beta < 1e-12 {
            break;
        }
        let newton = beta - g / h;
        beta = if h > 0.0 && newton > lo && newton < hi {
            newton
        } else {
            0.5 * (lo + hi)
        };
    }
    Some((1.0 / beta) as f32)
}

/// One bin of a reliability diagram: images whose top-1 probability falls in `[lower, upper)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    pub lower: f64,
    pub upper: f64,
    pub count: usize,
    pub mean_confidence: f64,
    pub accuracy: f64,
}

/// Top-1 probability and correctness of each row.
fn confidences(probs: &[f32], classes: usize, truth: &[usize]) -> Vec<(f64, bool)> {
    probs
        .chunks_exact(classes)
        .zip(truth)
        .map(|(row, &y)| {
            let best = crate::scoring::top_k(row, 1)[0];
            (row[best] as f64, best == y)
        })
        .collect()
}

/// The share of rows whose rejection score is at least `threshold` (every row without one), and
/// the top-1 accuracy on them.
pub fn answered(
    probs: &[f32],
    classes: usize,
    truth: &[usize],
    scores: &[f32],
    threshold: Option<f32>,
) -> (f64, f64) {
    let (mut kept, mut correct) = (0usize, 0usize);
    for (i, (_, right)) in confidences(probs, classes, truth).into_iter().enumerate() {
        let score = scores.get(i).copied().unwrap_or(f32::NAN);
        if threshold.is_none_or(|t| score >= t) {
            kept += 1;
            correct += right as usize;
        }
    }
    let share = kept as f64 / truth.len().max(1) as f64;
    let accuracy = if kept > 0 {
        correct as f64 / kept as f64
    } else {
        0.0
    };
    (share, accuracy)
}

/// Reliability diagram bins (`bins` equal widths over [0, 1]).
pub fn reliability(
    probs: &[f32],
    classes: usize,
    truth: &[usize],
    bins: usize,
) -> Vec<ReliabilityBin> {
    let bins = bins.max(1);
    let mut acc = vec![(0usize, 0f64, 0usize); bins];
    for (p, correct) in confidences(probs, classes, truth) {
        let b = ((p * bins as f64) as usize).min(bins - 1);
        acc[b].0 += 1;
        acc[b].1 += p;
        acc[b].2 += correct as usize;
    }
    acc.iter()
        .enumerate()
        .map(|(i, &(count, conf, correct))| ReliabilityBin {
            lower: i as f64 / bins as f64,
            upper: (i + 1) as f64 / bins as f64,
            count,
            mean_confidence: if count > 0 { conf / count as f64 } else { 0.0 },
            accuracy: if count > 0 {
                correct as f64 / count as f64
            } else {
                0.0
            },
        })
        .collect()
}

/// Expected calibration error over `bins` equal-width bins: the count-weighted mean gap between
/// confidence and accuracy.
pub fn expected_calibration_error(
    probs: &[f32],
    classes: usize,
    truth: &[usize],
    bins: usize,
) -> f64 {
    let n = truth.len().max(1) as f64;
    reliability(probs, classes, truth, bins)
        .iter()
        .map(|b| b.count as f64 / n * (b.mean_confidence - b.accuracy).abs())
        .sum()
}

/// Area under the ROC curve of a score meant to be higher in-distribution: the probability that a
/// random in-distribution image scores above a random out-of-distribution one (ties count half).
pub fn auroc(in_distribution: &[f32], out_of_distribution: &[f32]) -> f64 {
    if in_distribution.is_empty() || out_of_distribution.is_empty() {
        return f64::NAN;
    }
    let mut all: Vec<(f32, bool)> = in_distribution
        .iter()
        .map(|&s| (s, true))
        .chain(out_of_distribution.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Mann-Whitney U with mid-ranks for ties.
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j < all.len() && all[j].0 == all[i].0 {
            j += 1;
        }
        let mid_rank = (i + j + 1) as f64 / 2.0;
        rank_sum += mid_rank * all[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let (n_in, n_out) = (
        in_distribution.len() as f64,
        out_of_distribution.len() as f64,
    );
    (rank_sum - n_in * (n_in + 1.0) / 2.0) / (n_in * n_out)
}

/// A threshold on the score that lets through (score >= threshold) at most `target_false_accept`
/// of the out-of-distribution scores: halfway between the highest score it must stop and the next
/// higher one, so that rounding differences between two computations of the same score cannot
/// move an image across it.
pub fn threshold_for_false_accept(out_of_distribution: &[f32], target_false_accept: f64) -> f32 {
    let mut s = out_of_distribution.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let allowed = (target_false_accept.clamp(0.0, 1.0) * s.len() as f64).floor() as usize;
    let Some(&stop) = s.get(allowed) else {
        // Everything may pass: the lowest score either rule can give.
        return -1.0;
    };
    // The lowest score above `stop` (ties with it are stopped too).
    match s[..allowed].iter().rev().find(|&&v| v > stop) {
        Some(&above) => stop + (above - stop) / 2.0,
        None => next_up(stop).max(stop + (1.0 - stop) / 2.0),
    }
}

fn next_up(v: f32) -> f32 {
    if v.is_nan() || v == f32::INFINITY {
        return v;
    }
    let bits = v.to_bits();
    if v == 0.0 {
        f32::from_bits(1)
    } else if v > 0.0 {
        f32::from_bits(bits + 1)
    } else {
        f32::from_bits(bits - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits of a classifier that is right 80% of the time and overconfident about it.
    fn overconfident(n: usize) -> (Vec<f32>, Vec<usize>) {
        let mut logits = Vec::new();
        let mut truth = Vec::new();
        for i in 0..n {
            let y = i % 4;
            let predicted = if i % 5 == 0 { (y + 1) % 4 } else { y };
            for c in 0..4 {
                let wobble = ((i * 7 + c * 3) % 11) as f32 * 0.3;
                logits.push(if c == predicted {
                    12.0 + wobble
                } else {
                    wobble
                });
            }
            truth.push(y);
        }
        (logits, truth)
    }

    #[test]
    fn the_fitted_temperature_is_the_nll_minimum_and_lowers_the_calibration_error() {
        let (logits, truth) = overconfident(200);
        let t = fit_temperature(&logits, 4, &truth).expect("fit") as f64;
        assert!(t > 1.5, "an overconfident model is cooled: T = {t}");
        let at = |t: f64| nll(&logits, 4, &truth, t);
        assert!(
            at(t) <= at(t * 1.01) && at(t) <= at(t / 1.01),
            "not a minimum"
        );
        assert!(at(t) < at(1.0));
        let before = expected_calibration_error(&softmax_rows(&logits, 4, 1.0), 4, &truth, 15);
        let after = expected_calibration_error(&softmax_rows(&logits, 4, t as f32), 4, &truth, 15);
        assert!(after < before / 2.0, "ECE {before} -> {after}");
    }

    #[test]
    fn nothing_to_fit_is_said_so() {
        assert_eq!(fit_temperature(&[], 3, &[]), None);
        assert_eq!(fit_temperature(&[1.0, 1.0, 1.0, 1.0], 2, &[0, 1]), None);
        assert_eq!(fit_temperature(&[1.0, 2.0], 2, &[0, 1]), None, "shape");
    }

    #[test]
    fn auroc_and_threshold_by_hand() {
        assert_eq!(auroc(&[0.9, 0.8], &[0.1, 0.2]), 1.0);
        assert_eq!(auroc(&[0.1, 0.2], &[0.9, 0.8]), 0.0);
        assert_eq!(auroc(&[0.5], &[0.5]), 0.5);
        assert!((auroc(&[0.9, 0.3], &[0.5, 0.1]) - 0.75).abs() < 1e-12);
        let ood = [0.1, 0.2, 0.3, 0.9];
        let t = threshold_for_false_accept(&ood, 0.25);
        assert!((t - 0.6).abs() < 1e-6, "halfway between 0.3 and 0.9: {t}");
        assert_eq!(ood.iter().filter(|&&s| s >= t).count(), 1);
        let strict = threshold_for_false_accept(&ood, 0.0);
        assert!(strict > 0.9 && strict < 1.0);
        // Ties at the limit are stopped together.
        let tied = threshold_for_false_accept(&[0.5, 0.5, 0.5, 0.2], 0.5);
        assert!(tied > 0.5);
        assert_eq!(threshold_for_false_accept(&ood, 1.0), -1.0);
    }

    #[test]
    fn the_centroid_rule_scores_the_nearest_centroid() {
        // Two labels whose images point along x and along y.
        let embeddings = vec![vec![2.0, 0.0], vec![1.0, 0.1], vec![0.0, 3.0]];
        let centroids = class_centroids(&embeddings, &[0, 0, 1], 2, 2).expect("both labels");
        assert!((centroids[0] - 0.9988).abs() < 1e-3 && (centroids[3] - 1.0).abs() < 1e-6);
        assert_eq!(
            class_centroids(&embeddings, &[0, 0, 0], 3, 2),
            Err(vec![1, 2]),
            "labels without images are named"
        );
        let rule = RejectRule::new(RejectScore::Centroid, 0.9, &centroids, 2);
        let probs = [0.99, 0.01];
        // Along y: the second centroid, cosine 1.
        assert_eq!(rule.judge(&[0.0, 5.0], &probs), (false, 1.0));
        // Along the diagonal: cosine ~0.71 to both, unknown whatever the probabilities say.
        let (unknown, s) = rule.judge(&[1.0, -1.0], &probs);
        assert!(unknown && s < 0.72, "{s}");
        assert!(rule.judge(&[f32::NAN, 0.0], &probs).0, "NaN is unknown");
        let by_probability = RejectRule::new(RejectScore::Probability, 0.9, &[], 2);
        assert_eq!(by_probability.judge(&[1.0, -1.0], &probs), (false, 0.99));
        assert!(by_probability.judge(&[1.0, -1.0], &[0.6, 0.4]).0);
    }

    #[test]
    fn the_coverage_curve_answers_the_surest_first() {
        // Four rows, two classes; scores rank the right ones first.
        let probs = [0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.6, 0.4];
        let truth = [0, 0, 0, 1];
        let scores = [0.9, 0.8, 0.2, 0.1];
        let curve = coverage_curve(&probs, 2, &truth, &scores, 100);
        let acc: Vec<f64> = curve.iter().map(|p| p.accuracy).collect();
        assert_eq!(acc, vec![1.0, 1.0, 2.0 / 3.0, 0.5]);
        assert_eq!(curve.last().map(|p| p.coverage), Some(1.0));
        assert_eq!(
            answered(&probs, 2, &truth, &scores, Some(0.5)),
            (0.5, 1.0),
            "the two above 0.5, both right"
        );
        assert_eq!(coverage_curve(&probs, 2, &truth, &scores, 2).len(), 2);
    }

    #[test]
    fn reliability_bins_count_every_image_once() {
        let (logits, truth) = overconfident(50);
        let probs = softmax_rows(&logits, 4, 1.0);
        let bins = reliability(&probs, 4, &truth, 10);
        assert_eq!(bins.iter().map(|b| b.count).sum::<usize>(), 50);
        assert_eq!(bins.len(), 10);
    }
}
