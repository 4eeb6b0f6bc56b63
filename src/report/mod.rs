//! `resnet report RUN_DIR`: one self-contained `report.html` for a training run (no network, no JavaScript),
//! written at the end of every run and on interrupt, and on demand. It draws what the run folder holds:
//! `metrics.jsonl` (loss and accuracy per epoch, the learning rate and the per-layer gradient norms and update
//! ratios the monitor logged), `evaluation.json` (the confusion matrix and per-class accuracy of the epoch
//! `best.safetensors` holds) and `last.safetensors` (the recipe and where the run stands). Charts are SVG drawn
//! by `plotters`; everything the page shows comes from those files, so the same folder gives the same page.

pub mod charts;
pub mod metrics;
mod page;

pub use page::render;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::train::checkpoint::{self, Position};
use crate::train::evaluate::Recorded;
use crate::train::recipe::Recipe;

pub const FILE: &str = "report.html";

/// What a run folder holds that the report draws.
pub struct Run {
    pub dir: PathBuf,
    pub recipe: Recipe,
    pub position: Position,
    pub metrics: metrics::Metrics,
    pub best: Option<Recorded>,
}

impl Run {
    pub fn read(dir: &Path) -> Result<Run> {
        let last = dir.join("last.safetensors");
        if !last.exists() {
            let why =
                if dir.is_dir() { "is not a training run folder (no last.safetensors)" } else { "no such folder" };
            return Err(Error::file(dir, why));
        }
        let c = checkpoint::load(&last)?;
        let metrics_path = dir.join("metrics.jsonl");
        let metrics = if metrics_path.exists() { metrics::read(&metrics_path)? } else { metrics::Metrics::default() };
        Ok(Run { dir: dir.to_path_buf(), recipe: c.recipe, position: c.position, metrics, best: Recorded::load(dir)? })
    }
}

/// Write `RUN_DIR/report.html` (atomically) and return its path.
pub fn write(dir: &Path) -> Result<PathBuf> {
    let run = Run::read(dir)?;
    let html = page::render(&run)?;
    let path = dir.join(FILE);
    crate::files::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}
