//! The report page: a summary, the charts (inline SVG), the per-epoch table with timings, the best epoch's
//! confusion matrix and per-class accuracy, the notes and the recipe. Every string from the run (class names,
//! paths, the recipe) is HTML-escaped; the page needs no script and loads nothing.

use std::fmt::Write;

use plotters::style::RGBColor;

use super::Run;
use super::charts::{self, Line};
use super::metrics::GradRow;
use crate::error::Result;
use crate::train::evaluate::Recorded;

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VAL: RGBColor = RGBColor(214, 39, 40);
const TOP5: RGBColor = RGBColor(255, 127, 14);
const EMA: RGBColor = RGBColor(44, 160, 44);
const GLOBAL: RGBColor = RGBColor(0, 0, 0);
/// Per-layer lines take their stage's colour: stem, layer1..layer4, fc.
const STAGES: [(&str, RGBColor); 6] = [
    ("stem", RGBColor(127, 127, 127)),
    ("layer1", RGBColor(31, 119, 180)),
    ("layer2", RGBColor(44, 160, 44)),
    ("layer3", RGBColor(255, 127, 14)),
    ("layer4", RGBColor(214, 39, 40)),
    ("fc", RGBColor(148, 103, 189)),
];
/// Gradient records drawn at most (a long run's are thinned evenly; the lines stay readable).
const MAX_STEPS_DRAWN: usize = 600;

const STYLE: &str = "body{font-family:sans-serif;margin:24px auto;max-width:960px;color:#222}\
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f4f4f4}td.l,th.l{text-align:left}pre{background:#f7f7f7;padding:10px;font-size:12px;overflow:auto}\
.muted{color:#777}svg{display:block;margin:8px 0}";

pub fn esc(s: &str) -> String {
    s.chars().fold(String::with_capacity(s.len()), |mut out, c| {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
        out
    })
}

fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn pct(v: f64) -> String {
    format!("{:.2} %", v * 100.0)
}

pub fn render(run: &Run) -> Result<String> {
    let mut h = String::new();
    let title = format!("Training report: {}", run.dir.display());
    let _ = write!(h, "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{}</title>", esc(&title));
    let _ = write!(h, "<style>{STYLE}</style></head><body><h1>{}</h1>", esc(&title));
    summary(&mut h, run);
    curves(&mut h, run)?;
    epochs_table(&mut h, run);
    match &run.best {
        Some(best) => best_epoch(&mut h, best)?,
        None => {
            h.push_str("<h2>Best epoch</h2><p class=\"muted\">No evaluation recorded yet (no epoch has finished).</p>")
        }
    }
    if !run.metrics.notes.is_empty() {
        h.push_str("<h2>Notes</h2><ul>");
        for n in &run.metrics.notes {
            let _ = write!(h, "<li>step {}: {}</li>", n.step, esc(&n.message));
        }
        h.push_str("</ul>");
    }
    let _ = write!(h, "<h2>Recipe</h2><pre>{}</pre>", esc(&run.recipe.to_toml()));
    let _ = writeln!(h, "<p class=\"muted\">resnet-rs {}</p></body></html>", env!("CARGO_PKG_VERSION"));
    Ok(h)
}

fn summary(h: &mut String, run: &Run) {
    let (r, pos, epochs) = (&run.recipe, &run.position, &run.metrics.epochs);
    let mut rows: Vec<(&str, String)> = vec![
        ("run", r.summary()),
        (
            "progress",
            format!("epoch {} of {}, {} steps ({} skipped)", pos.epoch, r.epochs, pos.global_step, pos.skipped),
        ),
    ];
    if pos.best_epoch > 0 {
        rows.push((
            "best held-out top-1",
            format!("{} at epoch {} (best.safetensors)", pct(pos.best_top1), pos.best_epoch),
        ));
    }
    if let Some(last) = epochs.last() {
        let mut text = format!("epoch {}: top-1 {}, loss {:.4}", last.epoch, pct(last.val_top1), last.val_loss);
        if let Some(ema) = last.ema_val_top1 {
            let _ = write!(text, "; weight EMA top-1 {}", pct(ema));
        }
        rows.push(("last evaluation", text));
        let timed: Vec<f64> = epochs.iter().map(|e| e.seconds).filter(|&s| s > 0.0).collect();
        let mean_ips = epochs.iter().map(|e| e.images_per_s).sum::<f64>() / epochs.len() as f64;
        let time = if timed.is_empty() {
            "not recorded".to_string()
        } else {
            format!("{} over {} epochs", duration(timed.iter().sum()), timed.len())
        };
        rows.push(("time", format!("{time}; training {mean_ips:.0} images/s on average")));
    }
    h.push_str("<table>");
    for (k, v) in rows {
        let _ = write!(h, "<tr><th class=\"l\">{k}</th><td class=\"l\">{}</td></tr>", esc(&v));
    }
    h.push_str("</table>");
}

fn line(label: &str, color: RGBColor, points: Vec<(f64, f64)>) -> Line {
    Line { label: label.to_string(), color, points, in_legend: true }
}

fn curves(h: &mut String, run: &Run) -> Result<()> {
    let epochs = &run.metrics.epochs;
    h.push_str("<h2>Curves</h2>");
    if epochs.is_empty() && run.metrics.grads.is_empty() {
        h.push_str("<p class=\"muted\">Nothing logged yet.</p>");
        return Ok(());
    }
    let per_epoch = |f: &dyn Fn(&super::metrics::EpochRow) -> Option<f64>| -> Vec<(f64, f64)> {
        epochs.iter().filter_map(|e| Some((e.epoch as f64, f(e)?))).collect()
    };
    let mut loss = vec![
        line("train", TRAIN, per_epoch(&|e| Some(e.train_loss))),
        line("val", VAL, per_epoch(&|e| Some(e.val_loss))),
    ];
    let ema_loss = per_epoch(&|e| e.ema_val_loss);
    if !ema_loss.is_empty() {
        loss.push(line("val, weight EMA", EMA, ema_loss));
    }
    h.push_str(&charts::line_chart("loss", "epoch", "cross-entropy", &loss, false)?);

    let mut acc = vec![
        line("train top-1", TRAIN, per_epoch(&|e| Some(e.train_top1))),
        line("val top-1", VAL, per_epoch(&|e| Some(e.val_top1))),
    ];
    if run.best.as_ref().is_none_or(|b| b.classes.len() > 5) {
        acc.push(line("val top-5", TOP5, per_epoch(&|e| Some(e.val_top5))));
    }
    let ema_top1 = per_epoch(&|e| e.ema_val_top1);
    if !ema_top1.is_empty() {
        acc.push(line("val top-1, weight EMA", EMA, ema_top1));
    }
    h.push_str(&charts::line_chart("accuracy", "epoch", "fraction correct", &acc, false)?);

    let grads = thinned(&run.metrics.grads);
    let lr_steps: Vec<(f64, f64)> = grads.iter().filter_map(|g| Some((g.step as f64, g.lr?))).collect();
    let lr = if lr_steps.is_empty() {
        charts::line_chart(
            "learning rate",
            "epoch",
            "lr",
            &[line("lr", TRAIN, per_epoch(&|e| Some(f64::from(e.lr))))],
            false,
        )?
    } else {
        charts::line_chart("learning rate", "step", "lr", &[line("lr", TRAIN, lr_steps)], false)?
    };
    h.push_str(&lr);

    if grads.is_empty() {
        h.push_str("<p class=\"muted\">No gradient statistics (monitor_every = 0).</p>");
        return Ok(());
    }
    let mut norms = layer_lines(&grads, |l| l.grad_norm);
    norms.push(line("global", GLOBAL, grads.iter().map(|g| (g.step as f64, g.global_grad_norm)).collect()));
    h.push_str(&charts::line_chart("gradient norm per layer (conv and fc weights)", "step", "‖grad‖", &norms, true)?);
    let ratios = layer_lines(&grads, |l| l.update_ratio);
    h.push_str(&charts::line_chart("update ratio ‖Δw‖/‖w‖ per layer", "step", "ratio", &ratios, true)?);
    Ok(())
}

/// At most `MAX_STEPS_DRAWN` records, evenly spaced, the last one kept.
fn thinned(grads: &[GradRow]) -> Vec<&GradRow> {
    let every = grads.len().div_ceil(MAX_STEPS_DRAWN).max(1);
    let last = grads.len().saturating_sub(1);
    grads.iter().enumerate().filter(|(i, _)| i % every == 0 || *i == last).map(|(_, g)| g).collect()
}

/// The stage a parameter belongs to, for its line's colour.
fn stage(name: &str) -> usize {
    STAGES.iter().position(|(s, _)| name.starts_with(&format!("{s}."))).unwrap_or(0)
}

/// A convolution's or the classifier's weight (BN's scale and shift would double every line).
fn is_weight_layer(name: &str) -> bool {
    let Some(layer) = name.strip_suffix(".weight") else {
        return false;
    };
    let last = layer.rsplit('.').next().unwrap_or(layer);
    last.starts_with("conv") || layer.ends_with("downsample.0") || layer == "fc"
}

/// One line per conv/fc weight over the steps, coloured by stage, the first of each stage in the legend.
fn layer_lines(grads: &[&GradRow], value: impl Fn(&super::metrics::LayerRow) -> f64) -> Vec<Line> {
    let Some(first) = grads.first() else {
        return Vec::new();
    };
    let mut lines: Vec<Line> = Vec::new();
    let mut listed = [false; STAGES.len()];
    for layer in first.layers.iter().filter(|l| is_weight_layer(&l.name)) {
        let s = stage(&layer.name);
        let points = grads
            .iter()
            .filter_map(|g| g.layers.iter().find(|l| l.name == layer.name).map(|l| (g.step as f64, value(l))))
            .collect();
        lines.push(Line { label: STAGES[s].0.to_string(), color: STAGES[s].1, points, in_legend: !listed[s] });
        listed[s] = true;
    }
    lines
}

fn epochs_table(h: &mut String, run: &Run) {
    let epochs = &run.metrics.epochs;
    if epochs.is_empty() {
        return;
    }
    let ema = epochs.iter().any(|e| e.ema_val_top1.is_some());
    h.push_str("<h2>Epochs</h2><table><tr><th>epoch</th><th>train loss</th><th>train top-1</th><th>val loss</th><th>val top-1</th><th>val top-5</th>");
    if ema {
        h.push_str("<th>EMA top-1</th>");
    }
    h.push_str("<th>lr</th><th>images/s</th><th>time</th><th>skipped</th></tr>");
    for e in epochs {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:.4}</td><td>{}</td><td>{:.4}</td><td>{}</td><td>{}</td>",
            e.epoch,
            e.train_loss,
            pct(e.train_top1),
            e.val_loss,
            pct(e.val_top1),
            pct(e.val_top5)
        );
        if ema {
            let _ = write!(h, "<td>{}</td>", e.ema_val_top1.map(pct).unwrap_or_default());
        }
        let time = if e.seconds > 0.0 { duration(e.seconds) } else { String::new() };
        let _ = write!(
            h,
            "<td>{:.3e}</td><td>{:.0}</td><td>{time}</td><td>{}</td></tr>",
            e.lr, e.images_per_s, e.skipped_steps
        );
    }
    h.push_str("</table>");
}

fn best_epoch(h: &mut String, best: &Recorded) -> Result<()> {
    let _ = write!(
        h,
        "<h2>Best epoch: {} (best.safetensors)</h2><p>held-out top-1 {}, top-5 {}, loss {:.4}</p>",
        best.epoch,
        pct(best.top1),
        pct(best.top5),
        best.loss
    );
    let n = best.classes.len();
    if n <= charts::MAX_HEATMAP {
        h.push_str(&charts::confusion_matrix(&best.classes, &best.confusion)?);
    }
    h.push_str("<table><tr><th class=\"l\">class</th><th>images</th><th>accuracy</th><th class=\"l\">most often taken for</th></tr>");
    for (i, name) in best.classes.iter().enumerate() {
        let row = &best.confusion[i];
        let images: u64 = row.iter().sum();
        let confused = (0..n).filter(|&j| j != i && row[j] > 0).max_by_key(|&j| (row[j], std::cmp::Reverse(j)));
        let confused = confused.map(|j| format!("{} ({})", esc(&best.classes[j]), row[j])).unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td>{images}</td><td>{}</td><td class=\"l\">{confused}</td></tr>",
            esc(name),
            pct(best.per_class[i])
        );
    }
    h.push_str("</table>");
    Ok(())
}
