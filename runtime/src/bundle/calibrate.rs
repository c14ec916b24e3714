//! `runtime calibrate`: a bundle's temperature fitted on held-out labelled images and its
//! "unknown" rule's threshold chosen on out-of-distribution images, written into a copy of the
//! bundle.

use std::path::{Path, PathBuf};

use crate::calibration::{self, Calibration, FitReport, RejectReport, RejectRule, RejectScore};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::pipeline::{embed_files, PipelineOptions};

/// Labelled images (each with the index of its label among the bundle's) and, optionally, images
/// that are none of the labels.
pub struct CalibrationSet<'a> {
    /// What the labelled images are, for the record (data set, split).
    pub data: String,
    pub images: &'a [(PathBuf, usize)],
    /// Labelled images for the class centroids (centroid rule), when not `images`; with what they
    /// are, for the record.
    pub centroid_images: Option<(String, &'a [(PathBuf, usize)])>,
    pub ood_data: String,
    pub ood: &'a [PathBuf],
    /// What the "unknown" rule thresholds.
    pub score: RejectScore,
    /// The largest share of `ood` the unknown rule may let through.
    pub target_false_accept: f64,
}

/// The figures `runtime calibrate` prints (and the manifest keeps).
pub struct Fitted {
    pub calibration: Calibration,
    /// `[labels x dim]`: the centroid rule's class centroids.
    pub centroids: Option<Vec<f32>>,
    /// Images that failed to decode (left out).
    pub skipped: usize,
}

/// The image embeddings of the files that decode, with their labels (failures are left out and
/// counted).
fn embed_labelled(
    engine: &mut Engine,
    images: &[(PathBuf, usize)],
    options: &PipelineOptions,
) -> (Vec<Vec<f32>>, Vec<usize>, usize) {
    let files: Vec<PathBuf> = images.iter().map(|(p, _)| p.clone()).collect();
    let (mut embeddings, mut truth, mut failed) = (Vec::new(), Vec::new(), 0);
    for (row, (_, y)) in embed_files(engine, &files, options).into_iter().zip(images) {
        match row {
            Ok(row) => {
                embeddings.push(row);
                truth.push(*y);
            }
            Err(_) => failed += 1,
        }
    }
    (embeddings, truth, failed)
}

/// The logits behind classify's probabilities: `scale` x cosine, flattened.
fn logits(embeddings: &[Vec<f32>], labels: &[f32], scale: f32) -> Vec<f32> {
    embeddings
        .iter()
        .flat_map(|e| crate::scoring::logits(e, labels, scale))
        .collect()
}

/// Each embedding's rejection score under `rule`, its probabilities computed as classify does
/// (the same arithmetic, so a threshold chosen here holds there).
fn reject_scores(
    rule: &RejectRule,
    embeddings: &[Vec<f32>],
    labels: &[f32],
    scale: f32,
) -> Vec<f32> {
    embeddings
        .iter()
        .map(|e| rule.score(e, &crate::scoring::probabilities(e, labels, scale)))
        .collect()
}

/// Fits the temperature on `set.images` and, when `set.ood` is given, the threshold on the
/// rejection score that lets through at most `target_false_accept` of them.
pub fn fit(engine: &mut Engine, set: &CalibrationSet, options: &PipelineOptions) -> Result<Fitted> {
    let manifest = &engine.bundle.manifest;
    let (classes, dim, scale) = (
        manifest.labels.len(),
        manifest.embedding_dim,
        manifest.logit_scale,
    );
    let names: Vec<String> = manifest
        .labels
        .iter()
        .map(|l| l.label.name.clone())
        .collect();
    let labels = engine.bundle.label_embeddings.clone();
    let (embeddings, truth, mut skipped) = embed_labelled(engine, set.images, options);
    let flat = logits(&embeddings, &labels, scale);
    let temperature = calibration::fit_temperature(&flat, classes, &truth).ok_or_else(|| {
        Error::Calibration(format!(
            "no temperature can be fitted on {} decodable labelled images (need some, with differing scores)",
            truth.len()
        ))
    })?;
    let calibrated_scale = scale / temperature;
    let before = calibration::softmax_rows(&flat, classes, 1.0);
    let after = calibration::softmax_rows(&flat, classes, temperature);
    let mut report = FitReport {
        data: set.data.clone(),
        images: truth.len(),
        nll_before: calibration::nll(&flat, classes, &truth, 1.0),
        nll_after: calibration::nll(&flat, classes, &truth, temperature as f64),
        ece_before: calibration::expected_calibration_error(&before, classes, &truth, 15),
        ece_after: calibration::expected_calibration_error(&after, classes, &truth, 15),
        reject: None,
    };
    let (mut reject_below, mut centroids) = (None, None);
    if !set.ood.is_empty() {
        let (mut centroid_data, mut centroid_images) = (String::new(), 0);
        if set.score == RejectScore::Centroid {
            let other;
            let (what, rows, ys): (&String, &[Vec<f32>], &[usize]) = match &set.centroid_images {
                None => (&set.data, &embeddings, &truth),
                Some((what, images)) => {
                    let (rows, ys, failed) = embed_labelled(engine, images, options);
                    skipped += failed;
                    other = (rows, ys);
                    (what, &other.0, &other.1)
                }
            };
            let c = calibration::class_centroids(rows, ys, classes, dim).map_err(|missing| {
                Error::Calibration(format!(
                    "the centroid rule needs labelled images of every label; {what} has none of: {}",
                    missing.iter().map(|&i| names[i].as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?;
            (centroid_data, centroid_images) = (what.clone(), ys.len());
            centroids = Some(c);
        }
        let rule = RejectRule::new(set.score, 0.0, centroids.as_deref().unwrap_or(&[]), dim);
        let mut ood = Vec::new();
        for row in embed_files(engine, set.ood, options) {
            match row {
                Ok(row) => ood.push(row),
                Err(_) => skipped += 1,
            }
        }
        if ood.is_empty() {
            return Err(Error::Calibration(
                "none of the --ood images could be decoded".into(),
            ));
        }
        let ood_scores = reject_scores(&rule, &ood, &labels, calibrated_scale);
        let scores = reject_scores(&rule, &embeddings, &labels, calibrated_scale);
        let threshold =
            calibration::threshold_for_false_accept(&ood_scores, set.target_false_accept);
        let (kept, accuracy) =
            calibration::answered(&after, classes, &truth, &scores, Some(threshold));
        report.reject = Some(RejectReport {
            centroid_data,
            centroid_images,
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
            reject_score: if reject_below.is_some() {
                set.score
            } else {
                RejectScore::default()
            },
            fitted_on: report,
        },
        centroids,
        skipped,
    })
}

/// Writes `src`'s files into a new bundle at `out`, its manifest recording `calibration` (and the
/// class centroids of a centroid rule, replacing any the source had).
pub fn write_bundle(
    src: &super::Bundle,
    fitted: Fitted,
    name: &str,
    out: &Path,
    force: bool,
) -> Result<super::Bundle> {
    let mut manifest = src.manifest.clone();
    manifest.name = name.to_string();
    manifest.calibration = Some(fitted.calibration);
    manifest.format_version = manifest.needed_format_version();
    let mut w = super::copy_into(src, manifest, out, force, |role| match role {
        super::CLASS_CENTROIDS => super::CopiedFile::Drop,
        _ => super::CopiedFile::Same,
    })?;
    if let Some(c) = &fitted.centroids {
        let rows = src.manifest.labels.len();
        let npy = super::npy::to_bytes(&[rows, src.manifest.embedding_dim], c);
        w.add_file(super::CLASS_CENTROIDS, "class_centroids.npy", &npy, None)?;
    }
    w.finish()
}
