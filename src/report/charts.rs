//! The report's pictures as SVG text, drawn by `plotters` (its SVG backend with its built-in text metrics, so no
//! font files are read): line charts with a legend, on a linear or a log10 y axis, and the confusion matrix as a
//! heat map with class names on its axes.

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};

pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 340;

/// One line of a chart. Points with a non-finite value (a skipped step's NaN, a log of 0) are left out.
pub struct Line {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
    /// Listed in the legend (per-layer lines share a stage's entry).
    pub in_legend: bool,
}

fn drawing<E: std::fmt::Debug>(e: E) -> Error {
    Error::invalid(format!("drawing the report: {e:?}"))
}

/// A line chart of `lines` over x; with `log_y` the y axis is log10 and labelled in powers of ten. Markers are
/// drawn where a line has few points, so a one-epoch run still shows its values.
pub fn line_chart(title: &str, x_desc: &str, y_desc: &str, lines: &[Line], log_y: bool) -> Result<String> {
    let transform = |y: f64| if log_y { y.log10() } else { y };
    let lines: Vec<(&Line, Vec<(f64, f64)>)> = lines
        .iter()
        .map(|l| {
            let pts = l.points.iter().map(|&(x, y)| (x, transform(y))).filter(|(x, y)| x.is_finite() && y.is_finite());
            (l, pts.collect())
        })
        .collect();
    let all = lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    // Whole-number x (epochs, steps): no more ticks than there are whole numbers to label.
    let x_ticks = ((x1 - x0).floor() as usize + 1).clamp(2, 10);
    let pad = ((y1 - y0) * 0.06).max(if log_y { 0.1 } else { 1e-3 * y1.abs().max(1e-9) });
    let (y0, y1) = (y0 - pad, y1 + pad);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(drawing)?;
        let y_label = |v: &f64| if log_y { format!("{:.0e}", 10f64.powf(*v)) } else { format!("{v:.3}") };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(x_ticks)
            .x_label_formatter(&|v| if (v - v.round()).abs() < 1e-6 { format!("{}", v.round()) } else { String::new() })
            .y_label_formatter(&y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(drawing)?;
        for (line, pts) in &lines {
            let style = ShapeStyle::from(&line.color).stroke_width(2);
            let series = chart.draw_series(LineSeries::new(pts.iter().copied(), style)).map_err(drawing)?;
            if line.in_legend {
                let color = line.color;
                series
                    .label(line.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
            if pts.len() <= 30 {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, line.color.filled()))).map_err(drawing)?;
            }
        }
        if lines.iter().any(|(l, _)| l.in_legend) {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(drawing)?;
        }
        root.present().map_err(drawing)?;
    }
    Ok(svg)
}

/// Above this many classes the heat map has no names on its axes (they would overlap), above `MAX_HEATMAP` there
/// is none (the report lists the most confused pairs instead).
const MAX_NAMED: usize = 40;
pub const MAX_HEATMAP: usize = 200;

/// confusion[true][predicted] as a heat map, each row shaded by its share of that class's images, with the
/// counts written in the cells when there are few classes.
pub fn confusion_matrix(classes: &[String], confusion: &[Vec<u64>]) -> Result<String> {
    let n = classes.len();
    let last = n as i32 - 1;
    if n == 0 || confusion.len() != n {
        return Ok(String::new());
    }
    let side = (260 + 28 * n.min(MAX_NAMED)).clamp(420, 900) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (side + 140, side + 120)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let names = n <= MAX_NAMED;
        let mut chart = ChartBuilder::on(&root)
            .caption("confusion matrix (rows: true class, columns: predicted)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(if names { 130 } else { 30 })
            .y_label_area_size(if names { 130 } else { 40 })
            // An integer range's segments include its end: 0..n-1 is n cells.
            .build_cartesian_2d((0..last).into_segmented(), (0..last).into_segmented())
            .map_err(drawing)?;
        // Row i (true class i) is drawn at y = n-1-i, so class 0 is at the top.
        let name = |v: &SegmentValue<i32>, flip: bool| match v {
            SegmentValue::CenterOf(i) if names => {
                let i = if flip { n as i32 - 1 - i } else { *i };
                classes.get(i as usize).cloned().unwrap_or_default()
            }
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(n.min(MAX_NAMED))
            .y_labels(n.min(MAX_NAMED))
            .x_label_formatter(&|v| name(v, false))
            .y_label_formatter(&|v| name(v, true))
            .x_label_style(("sans-serif", 12).into_font().transform(FontTransform::Rotate90))
            .y_label_style(("sans-serif", 12))
            .draw()
            .map_err(drawing)?;
        let cell = |i: usize, j: usize| {
            let (x, y) = (j as i32, (n - 1 - i) as i32);
            [(SegmentValue::Exact(x), SegmentValue::Exact(y + 1)), (SegmentValue::Exact(x + 1), SegmentValue::Exact(y))]
        };
        let cells = confusion.iter().enumerate().flat_map(|(i, row)| {
            let total = row.iter().sum::<u64>().max(1) as f64;
            row.iter().enumerate().map(move |(j, &v)| (i, j, v, v as f64 / total))
        });
        chart
            .draw_series(cells.clone().map(|(i, j, _, share)| {
                // White (none of the row) to a deep blue (all of it).
                let shade = |full: f64| (255.0 - (255.0 - full) * share) as u8;
                Rectangle::new(cell(i, j), RGBColor(shade(20.0), shade(70.0), shade(160.0)).filled())
            }))
            .map_err(drawing)?;
        if n <= 20 {
            chart
                .draw_series(cells.filter(|c| c.2 > 0).map(|(i, j, v, share)| {
                    let color = if share > 0.5 { WHITE } else { BLACK };
                    let at = (SegmentValue::CenterOf(j as i32), SegmentValue::CenterOf((n - 1 - i) as i32));
                    let centred =
                        ("sans-serif", 12).into_font().color(&color).pos(Pos::new(HPos::Center, VPos::Center));
                    Text::new(v.to_string(), at, centred)
                }))
                .map_err(drawing)?;
        }
        root.present().map_err(drawing)?;
    }
    Ok(svg)
}
