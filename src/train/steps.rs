//! Where the training loop's steps run (`resnet train --device cpu|cuda[:N]|auto --dtype f32|tf32|bf16`), as one
//! interface: `Steps` splits a step into the phases the loop puts its guard, clipping and monitor between, so
//! `Trainer::step` is one path whatever the target. `CpuSteps` runs them on the host model and optimiser; the
//! GPU's (`gpu.rs`, feature `cuda`) holds the live weights, momentum buffers and BN running statistics on the
//! device and copies them into the host model and optimiser only when the loop needs them there (checkpoints,
//! evaluation, diagnosing a non-finite step).
//!
//! Per step the loop calls `forward_backward` (one read: loss, top-1 hits, every gradient's sum of squares and
//! whether activations and running statistics stayed finite); on a non-finite value `drop_step` (running
//! statistics back as they were, nothing updated) or `diagnose`; else `scale_gradients` when clipping, and
//! `update`, which on monitor steps also returns each trainable weight's norm and update norm.

use std::sync::Arc;

use rayon::prelude::*;

use super::evaluate::{EvalReport, evaluate, hits};
use super::monitor::{self, NonFinite};
use super::optim::Optimizer;
use super::recipe::Recipe;
use crate::data::Dataset;
use crate::data::loader::Batch;
use crate::data::transforms::Pipeline;
use crate::engine::cpu::{Cpu, Operands};
use crate::engine::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::model::{Mode, ResNet};
use crate::target::{BF16_CPU, Job, Precision, Target};

/// What forward and backward found, before anything is updated.
#[derive(Clone, Debug)]
pub struct Checked {
    pub loss: f32,
    pub top1_hits: usize,
    /// Per parameter in the store's order: the sum of squares of its gradient (0 for a frozen parameter). The
    /// global norm sums these in parameter order, so it does not depend on the target's thread count.
    pub grad_sumsq: Vec<f64>,
    /// Every block's output and every BN running statistic is finite (where the target can tell).
    pub state_finite: bool,
}

impl Checked {
    /// The global L2 norm of the gradients: the per-parameter sums added in parameter order.
    pub fn grad_norm(&self) -> f64 {
        self.grad_sumsq.iter().sum::<f64>().sqrt()
    }

    /// The loss, every gradient and the checked state are finite: the step may be applied.
    pub fn finite(&self) -> bool {
        self.loss.is_finite() && self.grad_norm().is_finite() && self.state_finite
    }
}

/// One training step in phases, on some target. `model` and `opt` are the host's copy; a target that keeps the
/// live state elsewhere reads them only in `sync_host`, `diagnose` and `evaluate`.
pub trait Steps {
    /// The device the steps run on, for the start-up line; None on the host CPU in f32.
    fn device_name(&self) -> Option<String>;

    /// Forward (train-mode BN) and backward on `batch`. With `keep_stats` the BN running statistics are saved
    /// first, for `drop_step`.
    fn forward_backward(&mut self, model: &mut ResNet, batch: &Batch, keep_stats: bool) -> Result<Checked>;

    /// Drop the step `forward_backward` began: running statistics back as they were saved, nothing updated.
    fn drop_step(&mut self, model: &mut ResNet) -> Result<()>;

    /// Multiply every trainable gradient by `c` (clipping).
    fn scale_gradients(&mut self, model: &mut ResNet, c: f32) -> Result<()>;

    /// Every gradient's sum of squares as it stands (after `scale_gradients`).
    fn grad_sumsq(&self, model: &ResNet) -> Result<Vec<f64>>;

    /// The optimiser update at `lr`, with the schedule's `momentum` (one-cycle) or the optimiser's own. With
    /// `monitor`, per trainable parameter (store order) the sum of squares
    /// of the updated weight and of the update.
    fn update(
        &mut self,
        model: &mut ResNet,
        opt: &mut Optimizer,
        lr: f32,
        momentum: Option<f32>,
        monitor: bool,
    ) -> Result<Option<Vec<(f64, f64)>>>;

    /// After a `forward_backward` that found `check` not finite: its cause, most specific first (see `NonFinite`).
    fn diagnose(&mut self, model: &mut ResNet, batch: &Batch, check: &Checked) -> Result<String>;

    /// Bring the live weights, statistics and optimiser state into `model` and `opt` (a no-op on the CPU).
    fn sync_host(&self, model: &mut ResNet, opt: &mut Optimizer) -> Result<()>;

    /// Evaluate `model` (synced) on `ds` where the steps run.
    fn evaluate(
        &self,
        model: &mut ResNet,
        ds: Arc<dyn Dataset>,
        pipe: Arc<Pipeline>,
        batch: usize,
        workers: usize,
    ) -> Result<EvalReport>;
}

/// What a training run asks of its target.
pub fn train_job(recipe: &Recipe) -> Job {
    Job::Train { optimizer: recipe.optimizer.name() }
}

/// The steps for `target` (resolved in `Target::resolve`), starting from the host model and optimiser as they
/// stand (a fresh run, or one just restored from a checkpoint).
pub fn open(target: Target, model: &ResNet, opt: &Optimizer, recipe: &Recipe) -> Result<Box<dyn Steps>> {
    let cpu = |(), precision| Ok(Box::new(CpuSteps::new(precision)?) as Box<dyn Steps>);
    target.resolve(train_job(recipe))?.open((), cpu, |&(), index, precision| gpu(model, opt, recipe, index, precision))
}

#[cfg(feature = "cuda")]
fn gpu(
    model: &ResNet,
    opt: &Optimizer,
    recipe: &Recipe,
    index: usize,
    precision: crate::target::Precision,
) -> Result<Box<dyn Steps>> {
    Ok(Box::new(super::gpu::GpuSteps::new(model, opt, recipe, index, precision)?))
}

#[cfg(not(feature = "cuda"))]
fn gpu(_: &ResNet, _: &Optimizer, _: &Recipe, _: usize, _: crate::target::Precision) -> Result<Box<dyn Steps>> {
    Err(crate::error::Error::invalid(crate::target::NO_GPU_BUILD))
}

/// The steps on the host: the CPU engine over the model's own tensors, in f32 or (`--dtype bf16`) bf16 mixed
/// precision (`Cpu::bf16`: bf16 convolution operands, f32 master weights, optimiser state, activations and BN).
#[derive(Default)]
pub struct CpuSteps {
    be: Cpu,
    /// The BN running statistics and batch count before the last forward, when the loop asked to keep them.
    saved_stats: Option<(Vec<Tensor>, i64)>,
}

impl CpuSteps {
    /// The steps in `precision` (f32 or bf16, as `Target::resolve` accepted it for training).
    pub fn new(precision: Precision) -> Result<CpuSteps> {
        let be = match precision {
            Precision::F32 => Cpu::F32,
            Precision::Bf16 => Cpu::bf16().ok_or_else(|| Error::invalid(BF16_CPU))?,
            other => return Err(Error::invalid(format!("--dtype {other}: the CPU trains in f32 or bf16"))),
        };
        Ok(CpuSteps { be, saved_stats: None })
    }
}

impl Steps for CpuSteps {
    fn device_name(&self) -> Option<String> {
        (self.be.operands() == Operands::Bf16).then(|| {
            "the CPU in bf16 mixed precision (bf16 convolution operands, f32 accumulation, weights and activations)"
                .to_string()
        })
    }

    fn forward_backward(&mut self, model: &mut ResNet, batch: &Batch, keep: bool) -> Result<Checked> {
        // Training-mode forward moves the BN running statistics; a dropped step must not keep that move.
        let store = &model.store;
        self.saved_stats =
            keep.then(|| (store.buffers.iter().map(|b| b.value.clone()).collect(), store.batches_tracked));
        model.store.zero_grad();
        let logits = model.forward(&self.be, &batch.images, Mode::Train);
        let (loss, dlogits) = self.be.softmax_cross_entropy(&logits, &batch.targets);
        model.backward(&self.be, &dlogits, false);
        let state_finite =
            model.first_nonfinite_output().is_none() && monitor::first_nonfinite_buffer(&model.store.buffers).is_none();
        let grad_sumsq = self.grad_sumsq(model)?;
        Ok(Checked { loss, top1_hits: hits(&logits, &batch.labels).0, grad_sumsq, state_finite })
    }

    fn drop_step(&mut self, model: &mut ResNet) -> Result<()> {
        if let Some((stats, tracked)) = self.saved_stats.take() {
            for (b, s) in model.store.buffers.iter_mut().zip(stats) {
                b.value = s;
            }
            model.store.batches_tracked = tracked;
        }
        model.store.zero_grad();
        Ok(())
    }

    fn scale_gradients(&mut self, model: &mut ResNet, c: f32) -> Result<()> {
        let params = &mut model.store.params;
        params.par_iter_mut().filter(|p| p.trainable).filter_map(|p| p.grad.as_mut()).for_each(|g| {
            g.data_mut().iter_mut().for_each(|v| *v *= c);
        });
        Ok(())
    }

    fn grad_sumsq(&self, model: &ResNet) -> Result<Vec<f64>> {
        // Each parameter's sum is sequential (reproducible), parameters in parallel.
        Ok(model
            .store
            .params
            .par_iter()
            .map(|p| match (&p.grad, p.trainable) {
                (Some(g), true) => g.data().iter().map(|&v| v as f64 * v as f64).sum::<f64>(),
                _ => 0.0,
            })
            .collect())
    }

    fn update(
        &mut self,
        model: &mut ResNet,
        opt: &mut Optimizer,
        lr: f32,
        momentum: Option<f32>,
        monitor: bool,
    ) -> Result<Option<Vec<(f64, f64)>>> {
        let params = &mut model.store.params;
        let before: Vec<Vec<f32>> = if monitor {
            params.iter().filter(|p| p.trainable).map(|p| p.value.data().to_vec()).collect()
        } else {
            vec![]
        };
        opt.step(params, lr, momentum);
        self.saved_stats = None;
        Ok(monitor.then(|| {
            params
                .iter()
                .filter(|p| p.trainable)
                .zip(&before)
                .map(|(p, b)| {
                    let w = p.value.data();
                    let sq = w.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
                    let delta = w.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum::<f64>();
                    (sq, delta)
                })
                .collect()
        }))
    }

    fn diagnose(&mut self, model: &mut ResNet, batch: &Batch, _: &Checked) -> Result<String> {
        let store = &model.store;
        Ok(NonFinite {
            input_finite: batch.images.all_finite(),
            output: model.first_nonfinite_output(),
            weight: monitor::first_nonfinite_weight(&store.params),
            buffer: monitor::first_nonfinite_buffer(&store.buffers),
            grad: monitor::last_nonfinite_grad(&store.params),
        }
        .describe())
    }

    fn sync_host(&self, _: &mut ResNet, _: &mut Optimizer) -> Result<()> {
        Ok(())
    }

    fn evaluate(
        &self,
        model: &mut ResNet,
        ds: Arc<dyn Dataset>,
        pipe: Arc<Pipeline>,
        batch: usize,
        workers: usize,
    ) -> Result<EvalReport> {
        evaluate(model, &self.be, ds, pipe, batch, workers)
    }
}
