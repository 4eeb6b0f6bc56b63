//! The training loop's GPU engine (feature `cuda`): one `CudaTrainer` step split in two, with the host's checks
//! in between, so that every feature of the CPU loop means the same on the device.
//!
//! Per step: stage the batch; (with `--skip-nonfinite`) a device copy of the BN running statistics; forward and
//! backward; one read of the loss, the top-1 hits and every gradient's and running statistic's sum of squares
//! (`CudaTrainer::check_step`). A non-finite value there drops the step before the SGD update is launched, so a
//! dropped step never touches weights or momentum, and the running statistics go back from the copy. Otherwise:
//! clipping scales the gradients on the device by the CPU's coefficient; the update runs; on monitor steps the
//! weights are copied on the device first and the per-parameter norms are read after. The host model and
//! optimiser receive the device state (`sync_into`) only for checkpoints, evaluation and diagnosis.

use std::sync::Arc;

use super::device::{GpuStep, GpuStepArgs};
use super::evaluate::{EvalReport, evaluate_with};
use super::monitor::{self, GradReport, LayerStats, NonFinite};
use super::optim::{Optimizer, clip_coefficient};
use super::recipe::Recipe;
use crate::data::Dataset;
use crate::data::loader::Batch;
use crate::data::transforms::Pipeline;
use crate::engine::cuda::{CudaResNet, CudaTrainer, TrainOptimizer};
use crate::error::Result;
use crate::model::ResNet;
use crate::target::Precision;

pub struct GpuSteps {
    trainer: CudaTrainer,
    device: usize,
    precision: Precision,
    /// Parameter names and whether each is trainable, in the store's order.
    params: Vec<(String, bool)>,
    /// Optimiser steps applied, as the CPU optimiser counts them (a checkpoint's `optimizer_steps`).
    opt_steps: u64,
    /// The last step's per-parameter gradient sums of squares, for `diagnose`.
    grad_sumsq: Vec<f64>,
    batch: usize,
}

impl GpuSteps {
    /// Upload `model` and the momentum buffers of `opt` to device `device`, for the recipe's batches.
    pub fn new(
        model: &ResNet,
        opt: &Optimizer,
        recipe: &Recipe,
        device: usize,
        precision: Precision,
    ) -> Result<GpuSteps> {
        let optimizer = TrainOptimizer { kind: opt.kind(), groups: opt.groups().to_vec() };
        let size = recipe.image_size as usize;
        let batch = recipe.batch_size;
        let mut trainer = CudaTrainer::new(model, device, batch, size, size, precision, optimizer)?;
        let (state, opt_steps) = opt.state(&model.store.params);
        trainer.load_momentum_state(&state)?;
        let params = model.store.params.iter().map(|p| (p.name.clone(), p.trainable)).collect();
        Ok(GpuSteps { trainer, device, precision, params, opt_steps, grad_sumsq: Vec::new(), batch })
    }

    pub fn describe(&self) -> String {
        self.trainer.device_name()
    }

    pub fn step(&mut self, batch: &Batch, a: GpuStepArgs) -> Result<GpuStep> {
        let t = &mut self.trainer;
        t.set_momentum(a.momentum);
        let n = t.stage(&batch.images, &batch.targets)?;
        if a.skip_nonfinite {
            t.save_running_stats()?;
        }
        t.forward_backward(n)?;
        let check = t.check_step(&batch.labels)?;
        // Summed in parameter order, as `optim::grad_norm` sums the per-parameter sums.
        let sumsq: f64 = check.grad_sumsq.iter().sum();
        self.grad_sumsq = check.grad_sumsq;
        if !(check.loss.is_finite() && sumsq.is_finite() && check.buffers_finite) {
            if a.skip_nonfinite {
                t.restore_running_stats()?;
            }
            return Ok(GpuStep::NonFinite { loss: check.loss });
        }
        let clip = if a.clip_grad_norm > 0.0 { clip_coefficient(sumsq.sqrt(), a.clip_grad_norm) } else { None };
        if let Some(c) = clip {
            t.scale_gradients(c)?;
        }
        let report = match a.monitor_step {
            None => {
                t.apply_update(a.lr)?;
                None
            }
            Some(step) => {
                // The CPU monitor reads the gradients after clipping.
                let grads = if clip.is_some() { t.grad_sumsq()? } else { self.grad_sumsq.clone() };
                t.snapshot_weights()?;
                t.apply_update(a.lr)?;
                let weights = t.weight_norms()?;
                let grad_norms: Vec<f64> = grads.iter().map(|g| g.sqrt()).collect();
                let layers = self
                    .params
                    .iter()
                    .zip(&grad_norms)
                    .zip(&weights)
                    .filter(|(((_, trainable), _), _)| *trainable)
                    .map(|(((name, _), &g), &(w, d))| LayerStats::new(name.clone(), g, w.sqrt(), d.sqrt()))
                    .collect();
                Some(GradReport::new(step, &grad_norms, layers))
            }
        };
        self.opt_steps += 1;
        Ok(GpuStep::Applied { loss: check.loss, top1_hits: check.top1_hits, report })
    }

    /// After a non-finite step (nothing updated): the cause, as the CPU loop words it. The device state goes into
    /// `model` (only on this failure path) for the weight and running-statistic checks.
    pub fn diagnose(&self, model: &mut ResNet, batch: &Batch) -> Result<String> {
        self.trainer.download_into(model)?;
        let output = self.trainer.first_nonfinite_output()?;
        let grad = self
            .params
            .iter()
            .zip(&self.grad_sumsq)
            .rev()
            .find(|((_, trainable), s)| *trainable && !s.is_finite())
            .map(|((name, _), _)| monitor::layer_name(name));
        let store = &model.store;
        Ok(NonFinite {
            input_finite: batch.images.all_finite(),
            output: output.as_deref(),
            weight: monitor::first_nonfinite_weight(&store.params),
            buffer: monitor::first_nonfinite_buffer(&store.buffers),
            grad,
        }
        .describe())
    }

    /// The device's weights, running statistics, batch count and momentum buffers into the host model and
    /// optimiser: what a checkpoint saves.
    pub fn sync_into(&self, model: &mut ResNet, opt: &mut Optimizer) -> Result<()> {
        self.trainer.download_into(model)?;
        let state = self.trainer.momentum_state()?;
        opt.load_state(&model.store.params, &state, self.opt_steps)
    }

    /// Evaluate `model` (synced from this trainer) with the eval executor on the same device and precision.
    pub fn evaluate(
        &self,
        model: &ResNet,
        ds: Arc<dyn Dataset>,
        pipe: Arc<Pipeline>,
        batch: usize,
        workers: usize,
    ) -> Result<EvalReport> {
        let mut exec: Option<CudaResNet> = None;
        let (device, precision, cap) = (self.device, self.precision, batch.max(self.batch));
        let mut forward = |x: &crate::engine::Tensor| {
            let gpu = match &mut exec {
                Some(gpu) => gpu,
                None => {
                    let [_, _, h, w] = x.dims4();
                    exec.insert(CudaResNet::with_precision(model, device, cap, h, w, precision)?)
                }
            };
            gpu.forward(x)
        };
        evaluate_with(&mut forward, model.config.num_classes, ds, pipe, batch, workers)
    }
}
