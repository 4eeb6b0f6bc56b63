//! `metrics.jsonl` read back for the report: the epoch records, the monitor's gradient records and the notes, in
//! the order the run wrote them. A resumed run may repeat an epoch it had not finished; the last record of an
//! epoch wins. A line that is not one of our records names the file and the line.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Far more than a long run writes (90 ImageNet epochs monitored every 50 steps: about 60 MB); a bigger file is
/// refused before it is read.
const MAX_BYTES: u64 = 1 << 30;

pub use crate::train::trainer::EpochReport as EpochRow;

#[derive(Clone, Debug, Deserialize)]
pub struct LayerRow {
    pub name: String,
    pub grad_norm: f64,
    pub update_ratio: f64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GradRow {
    pub step: u64,
    #[serde(default)]
    pub lr: Option<f64>,
    pub global_grad_norm: f64,
    pub layers: Vec<LayerRow>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Note {
    pub step: u64,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// One per epoch, in epoch order.
    pub epochs: Vec<EpochRow>,
    pub grads: Vec<GradRow>,
    pub notes: Vec<Note>,
}

/// Read `path` (see the header).
pub fn read(path: &Path) -> Result<Metrics> {
    let size = std::fs::metadata(path).map_err(|e| Error::file(path, e))?.len();
    if size > MAX_BYTES {
        return Err(Error::file(path, format!("is {size} bytes, more than a run's metrics (at most {MAX_BYTES})")));
    }
    let text = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    parse(&text).map_err(|e| e.in_file(path))
}

/// `read` on bytes already in memory (the fuzz target's entry).
pub fn parse(text: &[u8]) -> Result<Metrics> {
    let text = std::str::from_utf8(text).map_err(|e| Error::invalid(format!("not UTF-8 text: {e}")))?;
    let mut m = Metrics::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |e: serde_json::Error| Error::invalid(format!("line {}: not a metrics record: {e}", i + 1));
        let value: serde_json::Value = serde_json::from_str(line).map_err(bad)?;
        match value.get("type").and_then(|t| t.as_str()) {
            Some("epoch") => {
                let row: EpochRow = serde_json::from_value(value).map_err(bad)?;
                m.epochs.retain(|e| e.epoch < row.epoch);
                m.epochs.push(row);
            }
            Some("grad") => m.grads.push(serde_json::from_value(value).map_err(bad)?),
            Some("note") => m.notes.push(serde_json::from_value(value).map_err(bad)?),
            // Records of kinds this version does not draw are passed over.
            Some(_) => {}
            None => return Err(Error::invalid(format!("line {}: a record without a \"type\"", i + 1))),
        }
    }
    // A resumed run's gradient records restart where its checkpoint stood: keep the last of each step.
    m.grads.reverse();
    let mut seen = std::collections::BTreeSet::new();
    m.grads.retain(|g| seen.insert(g.step));
    m.grads.reverse();
    m.grads.sort_by_key(|g| g.step);
    Ok(m)
}
