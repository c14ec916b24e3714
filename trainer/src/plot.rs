//! Training curves as PNG: loss per epoch and validation (and, when monitored, test) top-1 per
//! epoch, one colour per learning rate (like the reference experiment's figures).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::train::EpochMetrics;

/// Draws `runs` (label, metrics per epoch) into a two-panel PNG. Returns false when no font is found.
pub fn curves(path: &Path, runs: &[(String, Vec<EpochMetrics>)]) -> Result<bool> {
    if !runtime::plot::ensure_font() {
        return Ok(false);
    }
    let err = |e: String| Error::Data(format!("{}: drawing failed: {e}", path.display()));
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
            // (legend, points, dashed)
            type Series = (String, Vec<(usize, f64)>, bool);
            let series: Vec<Series> = if pick == 0 {
                vec![(
                    label.clone(),
                    m.iter().map(|e| (e.epoch, e.train_loss)).collect(),
                    false,
                )]
            } else {
                vec![
                    (
                        format!("{label} val"),
                        m.iter()
                            .filter_map(|e| Some((e.epoch, e.val_top1?)))
                            .collect(),
                        false,
                    ),
                    (
                        format!("{label} test"),
                        m.iter()
                            .filter_map(|e| Some((e.epoch, e.test_top1?)))
                            .collect(),
                        true,
                    ),
                ]
            };
            for (name, points, dashed) in series {
                if points.is_empty() {
                    continue;
                }
                let style = color.stroke_width(2);
                let drawn = if dashed {
                    chart.draw_series(DashedLineSeries::new(points, 6, 4, style))
                } else {
                    chart.draw_series(LineSeries::new(points, style))
                };
                drawn
                    .map_err(|e| err(e.to_string()))?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
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
