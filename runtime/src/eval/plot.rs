//! Pictures of results (PNG, plotters): the confusion matrix of an evaluation, and a calibrated
//! bundle's reliability diagram and accuracy-coverage curve. Also the font set-up
//! the trainer's curves use.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a system font as "sans-serif"; false when none is installed (then no PNG is drawn and
/// the numbers stay in the CSV/JSON files).
pub fn ensure_font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// A heat map of `confusion[true][predicted]`, counts written in the cells, rows normalised for colour.
pub fn confusion(
    path: &Path,
    labels: &[String],
    confusion: &[Vec<usize>],
    title: &str,
) -> Result<bool> {
    if !ensure_font() {
        return Ok(false);
    }
    let err = |e: String| Error::Plot(format!("{}: drawing failed: {e}", path.display()));
    let n = labels.len();
    let cell = (560 / n.max(1)).clamp(18, 60) as u32;
    let margin = 180u32;
    let size = (margin + cell * n as u32 + 40, margin + cell * n as u32 + 60);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    root.draw(&Text::new(
        format!("confusion matrix: {title}"),
        (10, 10),
        ("sans-serif", 16),
    ))
    .map_err(|e| err(e.to_string()))?;
    let (x0, y0) = (margin as i32, (margin - 40) as i32);
    let font = ("sans-serif", (cell as f64 * 0.4).clamp(9.0, 14.0));
    for (t, row) in confusion.iter().enumerate() {
        let total: usize = row.iter().sum();
        for (p, &count) in row.iter().enumerate() {
            let share = if total > 0 {
                count as f64 / total as f64
            } else {
                0.0
            };
            let shade = (255.0 * (1.0 - share)) as u8;
            let color = RGBColor(shade, shade, 255);
            let (x, y) = (x0 + p as i32 * cell as i32, y0 + t as i32 * cell as i32);
            root.draw(&Rectangle::new(
                [(x, y), (x + cell as i32, y + cell as i32)],
                color.filled(),
            ))
            .map_err(|e| err(e.to_string()))?;
            if count > 0 {
                let ink = if share > 0.5 { WHITE } else { BLACK };
                root.draw(&Text::new(
                    count.to_string(),
                    (x + 3, y + cell as i32 / 3),
                    font.into_font().color(&ink),
                ))
                .map_err(|e| err(e.to_string()))?;
            }
        }
    }
    for (i, l) in labels.iter().enumerate() {
        let short: String = l.chars().take(22).collect();
        root.draw(&Text::new(
            short.clone(),
            (8, y0 + i as i32 * cell as i32 + cell as i32 / 3),
            font,
        ))
        .map_err(|e| err(e.to_string()))?;
        let style = font.into_font().transform(FontTransform::Rotate270);
        root.draw(&Text::new(
            short,
            (x0 + i as i32 * cell as i32 + cell as i32 / 3, y0 - 4),
            style,
        ))
        .map_err(|e| err(e.to_string()))?;
    }
    root.draw(&Text::new(
        "rows: true label, columns: predicted",
        (x0, y0 + (n as u32 * cell) as i32 + 12),
        ("sans-serif", 13),
    ))
    .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(true)
}

/// A reliability diagram: per confidence bin, the top-1 accuracy (bars) against the mean
/// confidence (the diagonal is perfect calibration), uncalibrated and calibrated side by side.
pub fn reliability(
    path: &Path,
    before: &[crate::calibration::ReliabilityBin],
    after: &[crate::calibration::ReliabilityBin],
    title: &str,
) -> Result<bool> {
    if !ensure_font() {
        return Ok(false);
    }
    let err = |e: String| Error::Plot(format!("{}: drawing failed: {e}", path.display()));
    let root = BitMapBackend::new(path, (1000, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let root = root
        .titled(&format!("reliability: {title}"), ("sans-serif", 18))
        .map_err(|e| err(e.to_string()))?;
    let panels = root.split_evenly((1, 2));
    for (panel, (bins, name)) in panels
        .iter()
        .zip([(before, "uncalibrated"), (after, "calibrated")])
    {
        let mut chart = ChartBuilder::on(panel)
            .caption(name, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("confidence (top-1 probability)")
            .y_desc("top-1 accuracy")
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(bins.iter().filter(|b| b.count > 0).map(|b| {
                Rectangle::new(
                    [(b.lower, 0.0), (b.upper, b.accuracy)],
                    BLUE.mix(0.5).filled(),
                )
            }))
            .map_err(|e| err(e.to_string()))?
            .label("accuracy")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], BLUE.mix(0.5).filled()));
        chart
            .draw_series(
                bins.iter()
                    .filter(|b| b.count > 0)
                    .map(|b| Circle::new((b.mean_confidence, b.accuracy), 3, RED.filled())),
            )
            .map_err(|e| err(e.to_string()))?
            .label("(mean confidence, accuracy)")
            .legend(|(x, y)| Circle::new((x + 7, y), 3, RED.filled()));
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(true)
}

/// Top-1 accuracy against the share answered as the "unknown" threshold moves, with the bundle's
/// threshold marked.
pub fn coverage(
    path: &Path,
    curve: &[crate::calibration::CoveragePoint],
    chosen: Option<(f64, f64)>,
    title: &str,
) -> Result<bool> {
    if !ensure_font() || curve.is_empty() {
        return Ok(false);
    }
    let err = |e: String| Error::Plot(format!("{}: drawing failed: {e}", path.display()));
    let root = BitMapBackend::new(path, (640, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let low = curve.iter().map(|p| p.accuracy).fold(1.0, f64::min);
    let floor = ((low - 0.05) * 10.0).floor().max(0.0) / 10.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..1f64, floor..1.0001f64)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("coverage (share of images answered)")
        .y_desc("top-1 accuracy on the answered images")
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(
            curve.iter().map(|p| (p.coverage, p.accuracy)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(e.to_string()))?
        .label("answering the highest-scoring first")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], BLUE.stroke_width(2)));
    if let Some(point) = chosen {
        chart
            .draw_series([Circle::new(point, 5, RED.filled())])
            .map_err(|e| err(e.to_string()))?
            .label("the bundle's threshold")
            .legend(|(x, y)| Circle::new((x + 7, y), 4, RED.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(true)
}
