//! The training loop's GPU steps (feature `cuda`): `Steps` over one `CudaTrainer`, whose step splits in two
//! (`forward_backward`, `apply_update`) with the loop's checks in between, so that every feature of the CPU loop
//! means the same on the device.
//!
//! Per step: stage the batch; (with `--skip-nonfinite`) a device copy of the BN running statistics; forward and
//! backward; one read of the loss, the top-1 hits and every gradient's and running statistic's sum of squares
//! (`CudaTrainer::check_step`). A non-finite value there drops the step before the SGD update is launched, so a
//! dropped step never touches weights or momentum, and the running statistics go back from the copy. Otherwise:
//! clipping scales the gradients on the device by the CPU's coefficient; the update runs; on monitor steps the
//! weights are copied on the device first and the per-parameter norms are read after. The host model and
//! optimiser receive the device state (`sync_host`) only for checkpoints, evaluation and diagnosis.

use std::sync::Arc;

use super::evaluate::{EvalReport, evaluate_with};
use super::monitor::{self, NonFinite};
use super::optim::Optimizer;
use super::recipe::Recipe;
use super::steps::{Checked, Steps};
use crate::data::Dataset;
use crate::data::loader::Batch;
use crate::data::transforms::Pipeline;
use crate::error::Result;
use crate::exec::cuda::{CudaResNet, CudaTrainer, TrainOptimizer};
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
    /// The last `forward_backward` saved the running statistics on the device.
    kept_stats: bool,
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
        Ok(GpuSteps { trainer, device, precision, params, opt_steps, kept_stats: false, batch })
    }
}

impl Steps for GpuSteps {
    fn device_name(&self) -> Option<String> {
        Some(self.trainer.device_name())
    }

    fn forward_backward(&mut self, _: &mut ResNet, batch: &Batch, keep: bool) -> Result<Checked> {
        let t = &mut self.trainer;
        let n = t.stage(&batch.images, &batch.targets)?;
        self.kept_stats = keep;
        if keep {
            t.save_running_stats()?;
        }
        t.forward_backward(n)?;
        let check = t.check_step(&batch.labels)?;
        Ok(Checked {
            loss: check.loss,
            top1_hits: check.top1_hits,
            grad_sumsq: check.grad_sumsq,
            state_finite: check.buffers_finite,
        })
    }

    fn drop_step(&mut self, _: &mut ResNet) -> Result<()> {
        // Nothing was updated: the update is a separate launch the loop never made.
        if std::mem::take(&mut self.kept_stats) {
            self.trainer.restore_running_stats()?;
        }
        Ok(())
    }

    fn scale_gradients(&mut self, _: &mut ResNet, c: f32) -> Result<()> {
        self.trainer.scale_gradients(c)
    }

    fn grad_sumsq(&self, _: &ResNet) -> Result<Vec<f64>> {
        self.trainer.grad_sumsq()
    }

    fn update(
        &mut self,
        _: &mut ResNet,
        _: &mut Optimizer,
        lr: f32,
        momentum: Option<f32>,
        monitor: bool,
    ) -> Result<Option<Vec<(f64, f64)>>> {
        let t = &mut self.trainer;
        t.set_momentum(momentum);
        self.kept_stats = false;
        self.opt_steps += 1;
        if !monitor {
            t.apply_update(lr)?;
            return Ok(None);
        }
        t.snapshot_weights()?;
        t.apply_update(lr)?;
        Ok(Some(t.weight_norms()?))
    }

    /// After a non-finite step (nothing updated): the cause, as the CPU loop words it. The device state goes into
    /// `model` (only on this failure path) for the weight and running-statistic checks.
    fn diagnose(&mut self, model: &mut ResNet, batch: &Batch, check: &Checked) -> Result<String> {
        self.trainer.download_into(model)?;
        let output = self.trainer.first_nonfinite_output()?;
        let grad = self
            .params
            .iter()
            .zip(&check.grad_sumsq)
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
    fn sync_host(&self, model: &mut ResNet, opt: &mut Optimizer) -> Result<()> {
        self.trainer.download_into(model)?;
        let state = self.trainer.momentum_state()?;
        opt.load_state(&model.store.params, &state, self.opt_steps)
    }

    /// Evaluate `model` (synced from this trainer) with the eval executor on the same device and precision.
    fn evaluate(
        &self,
        model: &mut ResNet,
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
        let classes = model.config.num_classes;
        evaluate_with(&mut forward, classes, ds, pipe, batch, workers)
    }
}
