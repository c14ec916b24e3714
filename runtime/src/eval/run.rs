//! One pass over a data set: encode every image once, score each template (or the bundle's own
//! label embeddings), collect the figures.

use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::eval::datasets::Sample;
use crate::eval::metrics::{self, Report};
use crate::pipeline::{self, PipelineOptions};
use crate::scoring;
use crate::text::labels::Label;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum MultiLabel {
    /// A hit when the top-1 is any of the image's labels.
    Any,
    /// Images with several labels are left out.
    Skip,
}

impl MultiLabel {
    /// The option value (`any`, `skip`), for messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            MultiLabel::Any => "any",
            MultiLabel::Skip => "skip",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateResult {
    /// The template, or `(bundle label embeddings)`.
    pub template: String,
    pub report: Report,
    /// Each image's five best labels with their probabilities, best first (predictions.csv).
    #[serde(skip)]
    pub ranked: Vec<Vec<(usize, f32)>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub dataset: String,
    pub split: String,
    pub bundle: String,
    pub labels: Vec<Label>,
    pub multi_label: MultiLabel,
    pub images: usize,
    pub multi_label_images: usize,
    pub unreadable: Vec<(PathBuf, String)>,
    /// Wall time of encoding the images, and of scoring all templates (text encoder included).
    pub encode_seconds: f64,
    pub score_seconds: f64,
    pub images_per_second: f64,
    pub results: Vec<TemplateResult>,
    /// For a calibrated bundle scored with its own label embeddings: its calibration on these
    /// images, over all of its labels (each image's first label as the truth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<crate::calibration::Evaluated>,
    /// The evaluated images and their labels, in the order of each result's `ranked`.
    #[serde(skip)]
    pub scored: Vec<(PathBuf, Vec<usize>)>,
}

impl Evaluation {
    /// The template with the best top-1.
    pub fn best(&self) -> &TemplateResult {
        self.results
            .iter()
            .max_by(|a, b| a.report.top1.total_cmp(&b.report.top1))
            .expect("at least one result")
    }
}

pub struct EvalOptions {
    /// Templates to score; empty = the bundle's own label embeddings.
    pub templates: Vec<String>,
    pub multi_label: MultiLabel,
    pub pipeline: PipelineOptions,
    pub dataset: String,
    pub split: String,
    /// Images that are none of the labels (a calibrated bundle's "unknown" rule is scored on
    /// them), and what they are, for the report.
    pub ood: Vec<PathBuf>,
    pub ood_data: String,
}

/// The bundle's label embeddings reordered to the data set's labels (see [`labels::match_labels`]).
pub fn bundle_embeddings(engine: &Engine, labels: &[Label]) -> Result<Vec<f32>> {
    let dim = engine.bundle.manifest.embedding_dim;
    let mine = engine.bundle.labels();
    let Some(index) = crate::text::labels::match_labels(&mine, labels) else {
        return Err(Error::Dataset(missing_labels_hint(&engine.bundle, labels)));
    };
    let mut out = Vec::with_capacity(labels.len() * dim);
    for i in index {
        out.extend_from_slice(&engine.bundle.label_embeddings[i * dim..(i + 1) * dim]);
    }
    Ok(out)
}

/// What to do when a bundle lacks a data set's labels, as one line.
pub fn missing_labels_hint(bundle: &crate::bundle::Bundle, labels: &[Label]) -> String {
    let mine = bundle.labels();
    let missing: Vec<&str> = labels
        .iter()
        .filter(|l| crate::text::labels::match_labels(&mine, std::slice::from_ref(l)).is_none())
        .map(|l| l.name.as_str())
        .collect();
    let fix = if bundle.has_text_encoder() {
        format!(
            "score them with its text encoder (--template \"a X-Ray image of {{}} part\"), or make a bundle with these labels: runtime prompts --model {} --labels SET --out models/NAME",
            bundle.dir.display()
        )
    } else {
        "it has no text encoder, so it cannot learn new labels: use a bundle with these labels, or make one from a bundle with a text encoder (runtime prompts --model BUNDLE --labels SET --out models/NAME; README: \"Get a real model\")".to_string()
    };
    format!(
        "bundle {} has no label {} of the data set (it has: {}); {fix}",
        bundle.dir.display(),
        missing
            .iter()
            .map(|m| format!("{m:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        mine.iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

pub fn evaluate(
    engine: &mut Engine,
    labels: &[Label],
    samples: &[Sample],
    opts: &EvalOptions,
) -> Result<Evaluation> {
    let multi = samples.iter().filter(|s| s.labels.len() > 1).count();
    let samples: Vec<&Sample> = samples
        .iter()
        .filter(|s| opts.multi_label == MultiLabel::Any || s.labels.len() == 1)
        .collect();
    if samples.is_empty() {
        return Err(Error::Dataset("no images to evaluate".into()));
    }
    // Label embeddings first: a bad template or a missing text encoder fails before the long part.
    let t_score = Instant::now();
    let label_sets: Vec<(String, Vec<f32>)> = if opts.templates.is_empty() {
        vec![(
            "(bundle label embeddings)".to_string(),
            bundle_embeddings(engine, labels)?,
        )]
    } else {
        opts.templates
            .iter()
            .map(|t| {
                Ok((
                    t.clone(),
                    pipeline::text_label_embeddings(engine, labels, std::slice::from_ref(t))?,
                ))
            })
            .collect::<Result<_>>()?
    };
    let mut score_seconds = t_score.elapsed().as_secs_f64();

    let files: Vec<PathBuf> = samples.iter().map(|s| s.path.clone()).collect();
    let t_encode = Instant::now();
    let embeddings = pipeline::embed_files(engine, &files, &opts.pipeline);
    let encode_seconds = t_encode.elapsed().as_secs_f64();
    let mut unreadable = Vec::new();
    let mut kept: Vec<(Vec<f32>, Vec<usize>)> = Vec::new();
    let mut scored = Vec::new();
    for (s, e) in samples.iter().zip(embeddings) {
        match e {
            Ok(e) => {
                kept.push((e, s.labels.clone()));
                scored.push((s.path.clone(), s.labels.clone()));
            }
            Err(err) => unreadable.push((s.path.clone(), err.to_string())),
        }
    }
    if kept.is_empty() {
        return Err(Error::Dataset(format!(
            "none of the {} images could be read",
            samples.len()
        )));
    }
    let scale = engine.bundle.manifest.logit_scale;
    let t_rank = Instant::now();
    let truth: Vec<Vec<usize>> = kept.iter().map(|(_, l)| l.clone()).collect();
    // Over all of the bundle's labels, as its temperature was fitted (and as classify scores).
    let calibration = match engine.bundle.manifest.calibration.clone() {
        Some(c) if opts.templates.is_empty() => {
            let mine = engine.bundle.labels();
            let index = crate::text::labels::match_labels(&mine, labels)
                .ok_or_else(|| Error::Dataset(missing_labels_hint(&engine.bundle, labels)))?;
            let classes = mine.len();
            let all = engine.bundle.label_embeddings.clone();
            let logits: Vec<f32> = kept
                .iter()
                .flat_map(|(e, _)| scoring::logits(e, &all, scale))
                .collect();
            let first: Vec<usize> = truth.iter().map(|l| index[l[0]]).collect();
            let rule = engine.bundle.reject_rule();
            let calibrated_scale = engine.bundle.manifest.calibrated_logit_scale();
            let reject_scores = |embeddings: &mut dyn Iterator<Item = &Vec<f32>>| -> Vec<f32> {
                let Some(r) = &rule else { return Vec::new() };
                embeddings
                    .map(|e| r.score(e, &scoring::probabilities(e, &all, calibrated_scale)))
                    .collect()
            };
            let scores = reject_scores(&mut kept.iter().map(|(e, _)| e));
            let mut evaluated = crate::calibration::evaluate(&logits, classes, &first, &scores, &c);
            if !opts.ood.is_empty() && rule.is_some() {
                let (mut ood, mut unreadable) = (Vec::new(), 0);
                for e in pipeline::embed_files(engine, &opts.ood, &opts.pipeline) {
                    match e {
                        Ok(e) => ood.push(e),
                        Err(_) => unreadable += 1,
                    }
                }
                let ood_scores = reject_scores(&mut ood.iter());
                evaluated.ood = Some(crate::calibration::OodEvaluated {
                    data: opts.ood_data.clone(),
                    images: ood_scores.len(),
                    unreadable,
                    unknown: ood_scores
                        .iter()
                        .filter(|&&s| rule.as_ref().is_some_and(|r| r.rejects(s)))
                        .count() as f64
                        / ood_scores.len().max(1) as f64,
                    auroc: crate::calibration::auroc(&scores, &ood_scores),
                });
            }
            Some(evaluated)
        }
        _ => None,
    };
    let results = label_sets
        .into_iter()
        .map(|(template, emb)| {
            let ranked: Vec<Vec<(usize, f32)>> = kept
                .iter()
                .map(|(e, _)| {
                    let p = scoring::probabilities(e, &emb, scale);
                    scoring::top_k(&p, 5)
                        .into_iter()
                        .map(|i| (i, p[i]))
                        .collect()
                })
                .collect();
            let top: Vec<Vec<usize>> = ranked
                .iter()
                .map(|r| r.iter().map(|&(i, _)| i).collect())
                .collect();
            TemplateResult {
                template,
                report: metrics::report(&top, &truth, labels.len()),
                ranked,
            }
        })
        .collect();
    score_seconds += t_rank.elapsed().as_secs_f64();
    Ok(Evaluation {
        dataset: opts.dataset.clone(),
        split: opts.split.clone(),
        bundle: engine.bundle.manifest.name.clone(),
        labels: labels.to_vec(),
        multi_label: opts.multi_label,
        images: kept.len(),
        multi_label_images: multi,
        unreadable,
        encode_seconds,
        score_seconds,
        images_per_second: samples.len() as f64 / encode_seconds.max(1e-9),
        results,
        calibration,
        scored,
    })
}
