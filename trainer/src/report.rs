//! What a run records and shows: per-epoch metrics, the run state kept with each checkpoint, the
//! final test, and the files written from them (`metrics.csv`, `metrics.json`, `best.json`,
//! `curves.png`).

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which epoch becomes the run's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Select {
    /// The epoch with the best top-1 on the validation rows, ties to the lower validation loss
    /// (needs --val).
    BestVal,
    /// The last epoch (the reference experiment's choice).
    Last,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    /// Learning rate of the epoch's last step.
    #[serde(default)]
    pub lr: f64,
    /// Top-1 on the validation rows (when there are some).
    #[serde(default)]
    pub val_top1: Option<f64>,
    /// Mean negative log-likelihood of the validation rows' labels (no smoothing).
    #[serde(default)]
    pub val_loss: Option<f64>,
    /// Top-1 on the test images (only with `monitor_test`).
    #[serde(default)]
    pub test_top1: Option<f64>,
    /// With a weight average (`--weight-average`), `val_top1` is the average's and this the live
    /// weights' validation top-1.
    #[serde(default)]
    pub val_top1_live: Option<f64>,
    pub seconds: f64,
    pub steps: usize,
    /// Steps skipped by the fp16 loss scaler (gradient overflow).
    pub skipped_steps: usize,
}

/// What a run directory remembers between epochs (`checkpoints/epoch-NNN/state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    pub epoch: usize,
    pub metrics: Vec<EpochMetrics>,
    /// The epoch with the best validation top-1 so far, ties to the lower validation loss (the last
    /// one without validation rows).
    pub best_epoch: usize,
    #[serde(default)]
    pub best_val_top1: Option<f64>,
    pub loss_scale: f64,
    /// Updates of the weight average so far (its decay ramps up with them).
    #[serde(default)]
    pub average_updates: u64,
}

impl RunState {
    /// The metrics of `epoch`, if it ran.
    pub fn epoch_metrics(&self, epoch: usize) -> Option<&EpochMetrics> {
        self.metrics.iter().find(|m| m.epoch == epoch)
    }
}

/// The one scoring of the test images, with the selected model, at the end of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinalTest {
    pub epoch: usize,
    pub select: Select,
    pub top1: f64,
    pub images: usize,
    /// Predicted label index per test image, in the test set's order.
    pub predictions: Vec<usize>,
}

/// `metrics.csv`, `metrics.json`, `best.json` (the selected epoch, its validation top-1 and loss,
/// the best validation epoch and, once scored, the test top-1) and `curves.png` of one run.
pub fn write_metrics(
    run_dir: &Path,
    state: &RunState,
    test: Option<&FinalTest>,
    label: &str,
) -> Result<()> {
    let cell = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let header = [
        "epoch",
        "train_loss",
        "lr",
        "val_top1",
        "test_top1",
        "seconds",
        "steps",
        "skipped_steps",
        "val_top1_live",
        "val_loss",
    ]
    .map(String::from);
    let rows = state.metrics.iter().map(|m| {
        [
            m.epoch.to_string(),
            m.train_loss.to_string(),
            m.lr.to_string(),
            cell(m.val_top1),
            cell(m.test_top1),
            format!("{:.3}", m.seconds),
            m.steps.to_string(),
            m.skipped_steps.to_string(),
            cell(m.val_top1_live),
            cell(m.val_loss),
        ]
    });
    runtime::fs::write_csv(
        &run_dir.join("metrics.csv"),
        std::iter::once(header).chain(rows),
    )?;
    runtime::fs::write_atomic(
        &run_dir.join("metrics.json"),
        &serde_json::to_vec_pretty(&state.metrics).expect("json"),
    )?;
    let epoch = test.map_or(state.best_epoch, |t| t.epoch);
    // The selected model's own validation figures (with `--select last` not the run's best).
    let selected = state.epoch_metrics(epoch);
    let best = serde_json::json!({
        "epoch": epoch,
        "select": test.map(|t| t.select),
        "val_top1": selected.and_then(|m| m.val_top1),
        "val_loss": selected.and_then(|m| m.val_loss),
        "best_val_epoch": state.best_val_top1.map(|_| state.best_epoch),
        "best_val_top1": state.best_val_top1,
        "test_top1": test.map(|t| t.top1),
        "test_images": test.map(|t| t.images),
        "checkpoint": format!("checkpoints/epoch-{epoch:03}"),
    });
    runtime::fs::write_atomic(
        &run_dir.join("best.json"),
        &serde_json::to_vec_pretty(&best).expect("json"),
    )?;
    curves(
        &run_dir.join("curves.png"),
        &[(label.to_string(), state.metrics.clone())],
    )?;
    Ok(())
}

/// Draws `runs` (label, metrics per epoch) into a two-panel PNG. Returns false when no font is found.
pub fn curves(path: &Path, runs: &[(String, Vec<EpochMetrics>)]) -> Result<bool> {
    if !runtime::eval::plot::ensure_font() {
        return Ok(false);
    }
    let err = |e: String| Error::Plot(format!("{}: drawing failed: {e}", path.display()));
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    let epochs = runs
        .iter()
        .flat_map(|(_, m)| m.iter().map(|e| e.epoch))
        .max()
        .unwrap_or(1)
        .max(2);
    let max_loss = runs
        .iter()
        .flat_map(|(_, m)| m.iter().map(|e| e.train_loss))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (panel, title, y_max, pick) in [
        (&left, "training loss", max_loss * 1.05, 0usize),
        (
            &right,
            "top-1 accuracy (validation; test dashed)",
            1.0,
            1usize,
        ),
    ] {
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(1usize..epochs, 0f64..y_max)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, (label, m)) in runs.iter().enumerate() {
            let color = palette[i % palette.len()];
            // (legend, points, dashed, faint)
            type Series = (String, Vec<(usize, f64)>, bool, bool);
            let series: Vec<Series> = if pick == 0 {
                vec![(
                    label.clone(),
                    m.iter().map(|e| (e.epoch, e.train_loss)).collect(),
                    false,
                    false,
                )]
            } else {
                let averaged = m.iter().any(|e| e.val_top1_live.is_some());
                vec![
                    (
                        format!("{label} val live weights"),
                        m.iter()
                            .filter_map(|e| Some((e.epoch, e.val_top1_live?)))
                            .collect(),
                        false,
                        true,
                    ),
                    (
                        if averaged {
                            format!("{label} val weight average (the model)")
                        } else {
                            format!("{label} val")
                        },
                        m.iter()
                            .filter_map(|e| Some((e.epoch, e.val_top1?)))
                            .collect(),
                        false,
                        false,
                    ),
                    (
                        format!("{label} test"),
                        m.iter()
                            .filter_map(|e| Some((e.epoch, e.test_top1?)))
                            .collect(),
                        true,
                        false,
                    ),
                ]
            };
            for (name, points, dashed, faint) in series {
                if points.is_empty() {
                    continue;
                }
                let style = if faint {
                    color.mix(0.35).stroke_width(1)
                } else {
                    color.stroke_width(2)
                };
                let drawn = if dashed {
                    chart.draw_series(DashedLineSeries::new(points, 6, 4, style))
                } else {
                    chart.draw_series(LineSeries::new(points, style))
                };
                drawn
                    .map_err(|e| err(e.to_string()))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: usize, val_top1: f64, val_loss: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            train_loss: 1.0,
            lr: 1e-3,
            val_top1: Some(val_top1),
            val_loss: Some(val_loss),
            test_top1: None,
            val_top1_live: None,
            seconds: 1.0,
            steps: 1,
            skipped_steps: 0,
        }
    }

    /// With `--select last`, best.json gives the last epoch's validation figures, not the run's
    /// best (which it keeps beside them).
    #[test]
    fn best_json_reports_the_selected_epochs_validation() {
        let dir = tempfile::tempdir().unwrap();
        let state = RunState {
            epoch: 2,
            metrics: vec![epoch(1, 0.9, 0.3), epoch(2, 0.8, 0.5)],
            best_epoch: 1,
            best_val_top1: Some(0.9),
            ..Default::default()
        };
        let test = FinalTest {
            epoch: 2,
            select: Select::Last,
            top1: 0.7,
            images: 10,
            predictions: vec![0; 10],
        };
        write_metrics(dir.path(), &state, Some(&test), "run").unwrap();
        let best: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("best.json")).unwrap()).unwrap();
        assert_eq!(best["epoch"], 2);
        assert_eq!(best["val_top1"], 0.8);
        assert_eq!(best["val_loss"], 0.5);
        assert_eq!(best["best_val_epoch"], 1);
        assert_eq!(best["best_val_top1"], 0.9);
        assert_eq!(best["checkpoint"], "checkpoints/epoch-002");
        assert_eq!(best["test_top1"], 0.7);
    }
}
