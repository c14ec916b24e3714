//! The evaluation report: report.json, report.md (tables), confusion.csv, confusion.png and
//! predictions.csv (each image's labels and best guesses).

use std::path::{Path, PathBuf};

use super::metrics::Report;
use super::Evaluation;
use crate::error::Result;

/// The per-template table (as the reference's prompt table), for the terminal and report.md.
pub fn template_table(ev: &Evaluation) -> String {
    let mut s = String::from(
        "| # | template | top-1 | top-5 | macro-F1 |\n| --- | --- | --- | --- | --- |\n",
    );
    for (i, r) in ev.results.iter().enumerate() {
        s.push_str(&format!(
            "| {} | `{}` | {:.4} | {:.4} | {:.4} |\n",
            i + 1,
            r.template,
            r.report.top1,
            r.report.top5,
            r.report.macro_f1
        ));
    }
    s
}

pub fn class_table(ev: &Evaluation, r: &Report) -> String {
    let mut s = String::from(
        "| label | precision | recall | F1 | support |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for (l, m) in ev.labels.iter().zip(&r.per_class) {
        s.push_str(&format!(
            "| {} | {:.4} | {:.4} | {:.4} | {} |\n",
            l.name, m.precision, m.recall, m.f1, m.support
        ));
    }
    s
}

/// One line on a calibrated bundle's calibration over the evaluated images.
pub fn calibration_line(c: &crate::calibration::Evaluated) -> String {
    let rule = match c.reject_below {
        Some(t) => format!(
            "; answered {:.4} of the images (unknown below {t:.4} {}), top-1 {:.4} on them",
            c.answered,
            c.reject_score.short_name(),
            c.top1_answered
        ),
        None => String::new(),
    };
    let ood = match &c.ood {
        Some(o) => format!(
            "; out-of-distribution ({} images of {}): {:.4} answered unknown, AUROC {:.4}",
            o.images, o.data, o.unknown, o.auroc
        ),
        None => String::new(),
    };
    format!(
        "calibration (temperature {:.4}): ECE {:.4} -> {:.4}, NLL {:.4} -> {:.4}{rule}{ood}",
        c.temperature, c.ece_uncalibrated, c.ece_calibrated, c.nll_uncalibrated, c.nll_calibrated
    )
}

/// Writes report.json, report.md, confusion.csv, confusion.png and predictions.csv (best
/// template) as the report folder `requested` (see [`crate::fs::resolve_output`]); returns where
/// it went.
pub fn write_reports(ev: &Evaluation, requested: &Path, force: bool) -> Result<PathBuf> {
    let target = crate::fs::resolve_output(
        requested,
        crate::fs::OutputKind::Report,
        || {
            crate::bundle::folder_name(&format!(
                "{}-{}-{}",
                ev.dataset.rsplit([':', '/']).next().unwrap_or("data"),
                ev.split,
                ev.bundle
            ))
        },
        force,
    )?;
    let staged = crate::fs::StagedDir::new(&target)?;
    let out = staged.path();
    let json = serde_json::to_vec_pretty(ev).expect("evaluation serialises");
    crate::fs::write_atomic(&out.join("report.json"), &json)?;
    let best = ev.best();
    let mut md = format!(
        "# Evaluation of `{}` on {} ({} split)\n\n{} images ({} with several labels, policy: {}), {} unreadable; \
         encoding {:.1} s ({:.1} images/s), scoring {:.2} s.\n\n## Templates\n\n{}\n## Per class (best: `{}`)\n\n{}\n",
        ev.bundle,
        ev.dataset,
        ev.split,
        ev.images,
        ev.multi_label_images,
        ev.multi_label.name(),
        ev.unreadable.len(),
        ev.encode_seconds,
        ev.images_per_second,
        ev.score_seconds,
        template_table(ev),
        best.template,
        class_table(ev, &best.report),
    );
    md.push_str(
        "## Confusion matrix (rows: true, columns: predicted)\n\n![confusion](confusion.png)\n",
    );
    if let Some(c) = &ev.calibration {
        md.push_str(&format!(
            "\n## Calibration\n\n{}\n\n![reliability](reliability.png)\n",
            calibration_line(c)
        ));
        if !c.coverage.is_empty() {
            md.push_str("\n![accuracy against coverage](coverage.png)\n");
        }
    }
    if !ev.unreadable.is_empty() {
        md.push_str("\n## Unreadable images\n\n");
        for (p, e) in &ev.unreadable {
            md.push_str(&format!("- `{}`: {e}\n", p.display()));
        }
    }
    crate::fs::write_atomic(&out.join("report.md"), md.as_bytes())?;
    let header = std::iter::once("true\\predicted".to_string())
        .chain(ev.labels.iter().map(|l| l.name.clone()))
        .collect::<Vec<_>>();
    let rows = ev
        .labels
        .iter()
        .zip(&best.report.confusion)
        .map(|(l, row)| {
            std::iter::once(l.name.clone())
                .chain(row.iter().map(|v| v.to_string()))
                .collect::<Vec<_>>()
        });
    crate::fs::write_csv(
        &out.join("confusion.csv"),
        std::iter::once(header).chain(rows),
    )?;
    crate::fs::write_csv(&out.join("predictions.csv"), prediction_rows(ev, best))?;
    #[cfg(feature = "plot")]
    {
        let names: Vec<String> = ev.labels.iter().map(|l| l.name.clone()).collect();
        super::plot::confusion(
            &out.join("confusion.png"),
            &names,
            &best.report.confusion,
            &best.template,
        )?;
        if let Some(c) = &ev.calibration {
            let title = format!("{} on {}", ev.bundle, ev.dataset);
            super::plot::reliability(
                &out.join("reliability.png"),
                &c.reliability_uncalibrated,
                &c.reliability,
                &title,
            )?;
            let chosen = c.reject_below.map(|_| (c.answered, c.top1_answered));
            super::plot::coverage(&out.join("coverage.png"), &c.coverage, chosen, &title)?;
        }
    }
    staged.commit()
}

/// predictions.csv: one row per evaluated image (path, its labels, the top-1 label and its
/// probability under the bundle's logit scale, whether it counts as a hit, the five best labels).
fn prediction_rows<'a>(
    ev: &'a Evaluation,
    best: &'a super::TemplateResult,
) -> impl Iterator<Item = Vec<String>> + 'a {
    let name = |i: usize| ev.labels[i].name.clone();
    let header = [
        "path",
        "labels",
        "predicted",
        "probability",
        "correct",
        "top5",
    ];
    std::iter::once(header.map(String::from).to_vec()).chain(
        ev.scored
            .iter()
            .zip(&best.ranked)
            .map(move |((path, labels), ranked)| {
                let (top, p) = ranked[0];
                vec![
                    path.display().to_string(),
                    labels
                        .iter()
                        .map(|&l| name(l))
                        .collect::<Vec<_>>()
                        .join(";"),
                    name(top),
                    format!("{p:.6}"),
                    labels.contains(&top).to_string(),
                    ranked
                        .iter()
                        .map(|&(i, _)| name(i))
                        .collect::<Vec<_>>()
                        .join(";"),
                ]
            }),
    )
}
