//! Where the training loop's steps run (`resnet train --device cpu|cuda[:N]|auto --dtype f32|tf32|bf16`): the CPU
//! engine on the host model, or a `CudaTrainer` (feature `cuda`, `gpu.rs`) that holds the live weights, momentum
//! buffers and BN running statistics on one GPU and copies them into the host model and optimiser only when the
//! loop needs them there (checkpoints, evaluation, diagnosing a non-finite step). Without the feature the GPU
//! engine's type is uninhabited, so the loop itself has no `cfg`.

use super::monitor::GradReport;
use super::optim::Optimizer;
use super::recipe::Recipe;
use crate::error::Result;
use crate::model::ResNet;
use crate::target::{Job, Target};

#[cfg(feature = "cuda")]
pub use super::gpu::GpuSteps;
#[cfg(not(feature = "cuda"))]
pub use no_gpu::GpuSteps;

#[cfg(not(feature = "cuda"))]
mod no_gpu {
    use std::sync::Arc;

    use super::{GpuStep, GpuStepArgs};
    use crate::data::Dataset;
    use crate::data::loader::Batch;
    use crate::data::transforms::Pipeline;
    use crate::error::{Error, Result};
    use crate::model::ResNet;
    use crate::target::Precision;
    use crate::train::evaluate::EvalReport;
    use crate::train::optim::Optimizer;
    use crate::train::recipe::Recipe;

    /// Without the `cuda` feature there is no GPU engine: this type has no values.
    pub enum GpuSteps {}

    impl GpuSteps {
        pub fn new(_: &ResNet, _: &Optimizer, _: &Recipe, _: usize, _: Precision) -> Result<GpuSteps> {
            Err(Error::invalid(crate::target::NO_GPU_BUILD))
        }
        pub fn describe(&self) -> String {
            match *self {}
        }
        pub fn step(&mut self, _: &Batch, _: GpuStepArgs) -> Result<GpuStep> {
            match *self {}
        }
        pub fn diagnose(&self, _: &mut ResNet, _: &Batch) -> Result<String> {
            match *self {}
        }
        pub fn sync_into(&self, _: &mut ResNet, _: &mut Optimizer) -> Result<()> {
            match *self {}
        }
        pub fn evaluate(
            &self,
            _: &ResNet,
            _: Arc<dyn Dataset>,
            _: Arc<Pipeline>,
            _: usize,
            _: usize,
        ) -> Result<EvalReport> {
            match *self {}
        }
    }
}

/// What the loop asks of one GPU step.
#[derive(Clone, Copy, Debug)]
pub struct GpuStepArgs {
    pub lr: f32,
    /// The schedule's momentum (one-cycle), or None for the optimiser's own.
    pub momentum: Option<f32>,
    /// 0: no clipping.
    pub clip_grad_norm: f32,
    /// The step number when the monitor reports at this step.
    pub monitor_step: Option<u64>,
    /// Take a device copy of the BN running statistics before the forward, to put back if the step is dropped.
    pub skip_nonfinite: bool,
}

/// What one GPU step did.
pub enum GpuStep {
    Applied {
        loss: f32,
        top1_hits: usize,
        report: Option<GradReport>,
    },
    /// The loss, a gradient or a running statistic went non-finite; nothing was updated (and with
    /// `skip_nonfinite` the running statistics are back as they were).
    NonFinite {
        loss: f32,
    },
}

/// What a training run asks of its target.
pub fn train_job(recipe: &Recipe) -> Job {
    Job::Train { optimizer: recipe.optimizer.name() }
}

/// The engine a `Trainer` steps with.
pub enum StepEngine {
    Cpu,
    Gpu(Box<GpuSteps>),
}

impl StepEngine {
    /// The engine for `target` (resolved in `Target::resolve`), starting from the host model and optimiser as
    /// they stand (a fresh run, or one just restored from a checkpoint).
    pub fn open(target: Target, model: &ResNet, opt: &Optimizer, recipe: &Recipe) -> Result<StepEngine> {
        let gpu = |&(): &(), i, p| Ok(StepEngine::Gpu(Box::new(GpuSteps::new(model, opt, recipe, i, p)?)));
        target.resolve(train_job(recipe))?.open((), |(), _| Ok(StepEngine::Cpu), gpu)
    }

    /// The GPU's name, or None on the CPU.
    pub fn gpu_name(&self) -> Option<String> {
        match self {
            StepEngine::Cpu => None,
            StepEngine::Gpu(gpu) => Some(gpu.describe()),
        }
    }
}
