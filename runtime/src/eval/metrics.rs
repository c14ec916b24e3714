//! Classification metrics: top-1 / top-5 accuracy, per-class precision, recall, F1 and support,
//! macro-F1, and the confusion matrix (rows: true label, columns: predicted top-1).
//!
//! Multi-label images (UNIFESP) count as a hit when the prediction is any of their labels; for the
//! per-class figures and the confusion matrix such an image's true label is the one predicted when
//! it was a hit, else its first label.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub images: usize,
    pub top1: f64,
    pub top5: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

/// `ranked[i]`: label indices of image `i`, best first (at least one); `truth[i]`: its labels.
pub fn report(ranked: &[Vec<usize>], truth: &[Vec<usize>], classes: usize) -> Report {
    assert_eq!(ranked.len(), truth.len());
    let n = ranked.len();
    let mut confusion = vec![vec![0usize; classes]; classes];
    let (mut top1, mut top5) = (0usize, 0usize);
    for (r, t) in ranked.iter().zip(truth) {
        let pred = r[0];
        let hit = t.contains(&pred);
        top1 += hit as usize;
        top5 += r.iter().take(5).any(|p| t.contains(p)) as usize;
        let true_label = if hit { pred } else { t[0] };
        confusion[true_label][pred] += 1;
    }
    let per_class: Vec<ClassMetrics> = (0..classes)
        .map(|c| {
            let tp = confusion[c][c] as f64;
            let support: usize = confusion[c].iter().sum();
            let predicted: usize = confusion.iter().map(|row| row[c]).sum();
            // As scikit-learn with zero_division=0: an undefined ratio counts as 0.
            let precision = if predicted > 0 {
                tp / predicted as f64
            } else {
                0.0
            };
            let recall = if support > 0 {
                tp / support as f64
            } else {
                0.0
            };
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            ClassMetrics {
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    // Macro average over the classes present in the truth or the predictions (scikit-learn's labels).
    let present: Vec<&ClassMetrics> = per_class
        .iter()
        .enumerate()
        .filter(|(c, m)| m.support > 0 || confusion.iter().any(|row| row[*c] > 0))
        .map(|(_, m)| m)
        .collect();
    let macro_f1 = if present.is_empty() {
        0.0
    } else {
        present.iter().map(|m| m.f1).sum::<f64>() / present.len() as f64
    };
    let div = |x: usize| if n > 0 { x as f64 / n as f64 } else { 0.0 };
    Report {
        images: n,
        top1: div(top1),
        top5: div(top5),
        macro_f1,
        per_class,
        confusion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_example() {
        // 3 classes; 6 images. truth: 0 0 1 1 2 2; top-1: 0 1 1 1 0 2.
        let ranked = vec![
            vec![0, 1],
            vec![1, 0],
            vec![1, 2],
            vec![1, 0],
            vec![0, 2],
            vec![2, 1],
        ];
        let truth: Vec<Vec<usize>> = [0, 0, 1, 1, 2, 2].iter().map(|&t| vec![t]).collect();
        let r = report(&ranked, &truth, 3);
        assert_eq!(
            r.confusion,
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]
        );
        assert!((r.top1 - 4.0 / 6.0).abs() < 1e-12);
        // top-5 (two ranked here): image 2 (truth 0, ranked 1,0) and image 5 (truth 2, ranked 0,2) hit.
        assert!((r.top5 - 1.0).abs() < 1e-12);
        // class 0: precision 1/2, recall 1/2; class 1: 2/3, 1; class 2: 1, 1/2.
        let f = |p: f64, r: f64| 2.0 * p * r / (p + r);
        assert!(
            (r.per_class[0].precision - 0.5).abs() < 1e-12
                && (r.per_class[0].recall - 0.5).abs() < 1e-12
        );
        assert!(
            (r.per_class[1].precision - 2.0 / 3.0).abs() < 1e-12
                && (r.per_class[1].recall - 1.0).abs() < 1e-12
        );
        assert!((r.per_class[2].f1 - f(1.0, 0.5)).abs() < 1e-12);
        let macro_f1 = (f(0.5, 0.5) + f(2.0 / 3.0, 1.0) + f(1.0, 0.5)) / 3.0;
        assert!((r.macro_f1 - macro_f1).abs() < 1e-12);
        assert_eq!(
            r.per_class.iter().map(|m| m.support).collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
    }

    #[test]
    fn multi_label_rows_hit_on_any_label() {
        let ranked = vec![vec![2], vec![1]];
        let truth = vec![vec![0, 2], vec![0, 2]];
        let r = report(&ranked, &truth, 3);
        assert!((r.top1 - 0.5).abs() < 1e-12);
        assert_eq!(r.confusion[2][2], 1);
        assert_eq!(r.confusion[0][1], 1);
    }
}
