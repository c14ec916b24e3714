//! `runtime calibrate`: a bundle's temperature fitted on held-out labelled images and its
//! "unknown" threshold chosen on out-of-distribution images, written into a copy of the bundle.

use std::path::{Path, PathBuf};

use crate::calibration::{self, Calibration, FitReport, RejectReport};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::pipeline::{embed_files, PipelineOptions};

/// Labelled images (each with the index of its label among the bundle's) and, optionally, images
/// that are none of the labels.
pub struct CalibrationSet<'a> {
    /// What the labelled images are, for the record (data set, split).
    pub data: String,
    pub images: &'a [(PathBuf, usize)],
    pub ood_data: String,
    pub ood: &'a [PathBuf],
    /// The largest share of `ood` the unknown rule may let through.
    pub target_false_accept: f64,
}

/// The figures `runtime calibrate` prints (and the manifest keeps).
pub struct Fitted {
    pub calibration: Calibration,
    /// Images that failed to decode (left out).
    pub skipped: usize,
}

/// The image embeddings of the files that decode (failures are left out and counted).
fn embed(
    engine: &mut Engine,
    files: &[PathBuf],
    options: &PipelineOptions,
) -> (Vec<Option<Vec<f32>>>, usize) {
    let mut failed = 0;
    let out = embed_files(engine, files, options)
        .into_iter()
        .map(|r| r.map_err(|_| failed += 1).ok())
        .collect();
    (out, failed)
}

/// Label probabilities at `scale` for each embedding, computed as classify does (the same
/// arithmetic, so a threshold chosen here holds there), flattened.
fn probabilities(embeddings: &[Vec<f32>], labels: &[f32], scale: f32) -> Vec<f32> {
    embeddings
        .iter()
        .flat_map(|e| crate::scoring::probabilities(e, labels, scale))
        .collect()
}

/// The logits behind [`probabilities`]: `scale` x cosine.
fn logits(embeddings: &[Vec<f32>], labels: &[f32], scale: f32) -> Vec<f32> {
    embeddings
        .iter()
        .flat_map(|e| crate::scoring::logits(e, labels, scale))
        .collect()
}

/// Fits the temperature on `set.images` and, when `set.ood` is given, the threshold on the
/// calibrated top-1 probability that lets through at most `target_false_accept` of them.
pub fn fit(engine: &mut Engine, set: &CalibrationSet, options: &PipelineOptions) -> Result<Fitted> {
    let classes = engine.bundle.manifest.labels.len();
    let scale = engine.bundle.manifest.logit_scale;
    let labels = engine.bundle.label_embeddings.clone();
    let files: Vec<PathBuf> = set.images.iter().map(|(p, _)| p.clone()).collect();
    let (rows, mut skipped) = embed(engine, &files, options);
    let mut embeddings = Vec::new();
    let mut truth = Vec::new();
    for (row, (_, y)) in rows.into_iter().zip(set.images) {
        if let Some(row) = row {
            embeddings.push(row);
            truth.push(*y);
        }
    }
    let flat = logits(&embeddings, &labels, scale);
    let temperature = calibration::fit_temperature(&flat, classes, &truth).ok_or_else(|| {
        Error::Calibration(format!(
            "no temperature can be fitted on {} decodable labelled images (need some, with differing scores)",
            truth.len()
        ))
    })?;
    let before = probabilities(&embeddings, &labels, scale);
    let after = probabilities(&embeddings, &labels, scale / temperature);
    let top1 = |probs: &[f32]| -> Vec<f32> {
        probs
            .chunks_exact(classes)
            .map(|r| r.iter().fold(0f32, |m, &p| m.max(p)))
            .collect()
    };
    let mut report = FitReport {
        data: set.data.clone(),
        images: truth.len(),
        nll_before: calibration::nll(&flat, classes, &truth, 1.0),
        nll_after: calibration::nll(&flat, classes, &truth, temperature as f64),
        ece_before: calibration::expected_calibration_error(&before, classes, &truth, 15),
        ece_after: calibration::expected_calibration_error(&after, classes, &truth, 15),
        reject: None,
    };
    let mut reject_below = None;
    if !set.ood.is_empty() {
        let (ood_rows, ood_skipped) = embed(engine, set.ood, options);
        skipped += ood_skipped;
        let ood: Vec<Vec<f32>> = ood_rows.into_iter().flatten().collect();
        let ood_scores = top1(&probabilities(&ood, &labels, scale / temperature));
        if ood_scores.is_empty() {
            return Err(Error::Calibration(
                "none of the --ood images could be decoded".into(),
            ));
        }
        let scores = top1(&after);
        let threshold =
            calibration::threshold_for_false_accept(&ood_scores, set.target_false_accept);
        let (kept, accuracy) = calibration::answered(&after, classes, &truth, Some(threshold));
        report.reject = Some(RejectReport {
            ood_data: set.ood_data.clone(),
            ood_images: ood_scores.len(),
            target_false_accept: set.target_false_accept,
            false_accept: ood_scores.iter().filter(|&&s| s >= threshold).count() as f64
                / ood_scores.len() as f64,
            in_distribution_accepted: kept,
            accuracy_accepted: accuracy,
            auroc: calibration::auroc(&scores, &ood_scores),
        });
        reject_below = Some(threshold);
    }
    Ok(Fitted {
        calibration: Calibration {
            temperature,
            reject_below,
            fitted_on: report,
        },
        skipped,
    })
}

/// Writes `src`'s files into a new bundle at `out`, its manifest recording `calibration`.
pub fn write_bundle(
    src: &super::Bundle,
    calibration: Calibration,
    name: &str,
    out: &Path,
    force: bool,
) -> Result<super::Bundle> {
    let mut manifest = src.manifest.clone();
    manifest.name = name.to_string();
    manifest.format_version = super::CALIBRATED_FORMAT_VERSION;
    manifest.calibration = Some(calibration);
    super::write_copy(src, manifest, out, force, |_| super::CopiedFile::Same)
}
