//! Evaluation on a held-out set: loss, top-1/top-5, per-class accuracy and the confusion matrix.

use std::sync::Arc;

use serde::Serialize;

use crate::data::Dataset;
use crate::data::loader::{self, LoaderConfig};
use crate::data::transforms::Pipeline;
use crate::engine::{Backend, Tensor};
use crate::error::Result;
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
    let be = crate::engine::cpu::Cpu;
    let cfg = LoaderConfig { batch_size: batch, shuffle: false, drop_last: false, workers, seed: 0 };
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
    let per_class =
        confusion.iter().enumerate().map(|(i, r)| r[i] as f64 / r.iter().sum::<u64>().max(1) as f64).collect();
    Ok(EvalReport {
        loss: loss_sum / n,
        top1: top1 as f64 / n,
        top5: top5 as f64 / n,
        per_class,
        confusion,
        predictions,
    })
}
