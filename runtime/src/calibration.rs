//! Scores a user can trust: temperature scaling (Guo et al. 2017) fitted on held-out labelled
//! images, and an "unknown" rule (a threshold on the calibrated top-1 probability) chosen for a
//! false-accept rate on out-of-distribution images; with the measures that judge both (negative
//! log-likelihood, expected calibration error, reliability bins, AUROC of the rejection score).

use serde::{Deserialize, Serialize};

/// What a bundle's manifest records under `calibration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Logits are divided by it before the softmax (1: unchanged).
    pub temperature: f32,
    /// Below this calibrated top-1 probability the answer is `unknown`; none: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_below: Option<f32>,
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
    pub ood_data: String,
    pub ood_images: usize,
    /// The largest share of out-of-distribution images the threshold lets through (asked).
    pub target_false_accept: f64,
    /// The share it lets through on those images (at most the target).
    pub false_accept: f64,
    /// The share of the labelled images it keeps, and their top-1 accuracy.
    pub in_distribution_accepted: f64,
    pub accuracy_accepted: f64,
    /// Area under the ROC curve of the calibrated top-1 probability, in- vs out-of-distribution.
    pub auroc: f64,
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
    /// The share of the images answered (not `unknown`), and the top-1 accuracy on them.
    pub answered: f64,
    pub top1_answered: f64,
    /// Reliability diagram of the calibrated probabilities (15 bins).
    pub reliability: Vec<ReliabilityBin>,
}

/// [`Evaluated`] from the logits (`rows x classes`) of labelled images.
pub fn evaluate(
    logits: &[f32],
    classes: usize,
    truth: &[usize],
    calibration: &Calibration,
) -> Evaluated {
    let t = calibration.temperature;
    let raw = softmax_rows(logits, classes, 1.0);
    let calibrated = softmax_rows(logits, classes, t);
    let (answered, top1_answered) = answered(&calibrated, classes, truth, calibration.reject_below);
    Evaluated {
        temperature: t,
        ece_uncalibrated: expected_calibration_error(&raw, classes, truth, 15),
        ece_calibrated: expected_calibration_error(&calibrated, classes, truth, 15),
        nll_uncalibrated: nll(logits, classes, truth, 1.0),
        nll_calibrated: nll(logits, classes, truth, t as f64),
        reject_below: calibration.reject_below,
        answered,
        top1_answered,
        reliability: reliability(&calibrated, classes, truth, 15),
    }
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

/// The share of rows whose top-1 probability is at least `threshold` (every row without one), and
/// the top-1 accuracy on them.
pub fn answered(
    probs: &[f32],
    classes: usize,
    truth: &[usize],
    threshold: Option<f32>,
) -> (f64, f64) {
    let (mut kept, mut correct) = (0usize, 0usize);
    for (p, right) in confidences(probs, classes, truth) {
        if threshold.is_none_or(|t| p >= t as f64) {
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
        return 0.0;
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
        assert_eq!(threshold_for_false_accept(&ood, 1.0), 0.0);
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
