//! Evaluation on a held-out set: loss, top-1/top-5, per-class accuracy and the confusion matrix, and the record
//! of the evaluation `best.safetensors` scored (`evaluation.json`, which the run's report draws).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::data::loader::{self, LoaderConfig, Shard};
use crate::data::transforms::Pipeline;
use crate::engine::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::model::{Mode, ResNet};

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<f64>,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<u64>>,
    /// (label, top-1 prediction) of every sample, in dataset order.
    #[serde(skip)]
    pub predictions: Vec<(usize, usize)>,
}

/// Top-1/top-5 hits of a batch.
pub fn hits(logits: &Tensor, labels: &[usize]) -> (usize, usize) {
    let c = logits.shape()[1];
    let (mut top1, mut top5) = (0, 0);
    for (row, &l) in logits.data().chunks(c).zip(labels) {
        let better = row.iter().filter(|&&v| v > row[l]).count();
        top1 += (better == 0) as usize;
        top5 += (better < 5) as usize;
    }
    (top1, top5)
}

/// Evaluate the CPU engine's `model` in eval mode.
pub fn evaluate(
    model: &mut ResNet,
    be: &dyn Backend,
    ds: Arc<dyn Dataset>,
    pipe: Arc<Pipeline>,
    batch: usize,
    workers: usize,
) -> Result<EvalReport> {
    let classes = model.config.num_classes;
    evaluate_with(&mut |x| Ok(model.forward(be, x, Mode::Eval)), classes, ds, pipe, batch, workers)
}

/// Evaluate whatever `forward` runs (the CPU engine, or `infer::runner::Runner` on a GPU): images in, logits
/// over `classes` out.
pub fn evaluate_with(
    forward: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    classes: usize,
    ds: Arc<dyn Dataset>,
    pipe: Arc<Pipeline>,
    batch: usize,
    workers: usize,
) -> Result<EvalReport> {
    let be = crate::engine::cpu::Cpu::F32;
    let cfg =
        LoaderConfig { batch_size: batch, shuffle: false, drop_last: false, workers, seed: 0, shard: Shard::WHOLE };
    let (mut loss_sum, mut top1, mut top5, mut n) = (0.0f64, 0usize, 0usize, 0usize);
    let mut confusion = vec![vec![0u64; classes]; classes];
    let mut predictions = Vec::with_capacity(ds.len());
    for b in loader::batches(ds, pipe, None, &cfg, 0, 0) {
        let b = b?;
        let logits = forward(&b.images)?;
        let (loss, _) = be.softmax_cross_entropy(&logits, &b.targets);
        let (h1, h5) = hits(&logits, &b.labels);
        loss_sum += loss as f64 * b.labels.len() as f64;
        (top1, top5, n) = (top1 + h1, top5 + h5, n + b.labels.len());
        for (row, &l) in logits.data().chunks(classes).zip(&b.labels) {
            // The first of equal maxima, as `infer::top_k` (and so `predict`) ranks them.
            let pred = (0..row.len()).fold(0, |best, i| if row[i].total_cmp(&row[best]).is_gt() { i } else { best });
            confusion[l][pred] += 1;
            predictions.push((l, pred));
        }
    }
    let n = n.max(1) as f64;
    let per_class = per_class(&confusion);
    Ok(EvalReport {
        loss: loss_sum / n,
        top1: top1 as f64 / n,
        top5: top5 as f64 / n,
        per_class,
        confusion,
        predictions,
    })
}

/// Each class's accuracy from a confusion matrix (`confusion[true][predicted]`); 0 for a class with no samples.
pub fn per_class(confusion: &[Vec<u64>]) -> Vec<f64> {
    confusion.iter().enumerate().map(|(i, r)| r[i] as f64 / r.iter().sum::<u64>().max(1) as f64).collect()
}

/// The evaluation of the epoch `best.safetensors` holds, written beside it (atomically, whenever it improves) as
/// `evaluation.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recorded {
    /// 1-based.
    pub epoch: u64,
    pub classes: Vec<String>,
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<f64>,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<u64>>,
}

impl Recorded {
    pub const FILE: &str = "evaluation.json";
    /// Larger than a 1000-class confusion matrix written out in full (about 4 MB): refused before it is parsed.
    const MAX_BYTES: u64 = 64 << 20;

    pub fn new(epoch: u64, classes: Vec<String>, eval: &EvalReport) -> Recorded {
        Recorded {
            epoch,
            classes,
            loss: eval.loss,
            top1: eval.top1,
            top5: eval.top5,
            per_class: eval.per_class.clone(),
            confusion: eval.confusion.clone(),
        }
    }

    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join(Self::FILE)
    }

    pub fn save(&self, run_dir: &Path) -> Result<()> {
        let path = Self::path(run_dir);
        let text = serde_json::to_vec(self).map_err(|e| Error::file(&path, e))?;
        crate::files::write_atomic(&path, &text)
    }

    /// The record in `run_dir`, None if there is none; a record whose sizes disagree is refused in one line.
    pub fn load(run_dir: &Path) -> Result<Option<Recorded>> {
        let path = Self::path(run_dir);
        let Ok(meta) = std::fs::metadata(&path) else {
            return Ok(None);
        };
        if meta.len() > Self::MAX_BYTES {
            return Err(Error::file(&path, format!("is {} bytes, more than an evaluation record holds", meta.len())));
        }
        let text = std::fs::read(&path).map_err(|e| Error::file(&path, e))?;
        Ok(Some(Recorded::parse(&text).map_err(|e| e.in_file(&path))?))
    }

    /// `load` on bytes already in memory (the fuzz target's entry).
    pub fn parse(text: &[u8]) -> Result<Recorded> {
        let r: Recorded =
            serde_json::from_slice(text).map_err(|e| Error::invalid(format!("not an evaluation record: {e}")))?;
        let n = r.classes.len();
        if r.per_class.len() != n || r.confusion.len() != n || r.confusion.iter().any(|row| row.len() != n) {
            return Err(Error::invalid(format!("per-class figures or confusion matrix are not for {n} classes")));
        }
        Ok(r)
    }
}
