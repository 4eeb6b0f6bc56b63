//! Data-parallel training, the way PyTorch DDP does it: every rank (one process; `mpirun -n N resnet train
//! --distributed`) holds the whole network, trains on its own shard of each epoch (`loader::Shard`, as
//! `DistributedSampler`), and after backward the gradients are averaged over the ranks, so every rank applies
//! the same update to the same weights. BN running statistics are broadcast from rank 0 before every forward
//! (DDP's `broadcast_buffers=True`), so the ranks' networks are identical whenever one is evaluated or saved.
//!
//! `Comm` is the little the loop needs from a communicator; `mpi.rs` (feature `mpi`) implements it on MPI
//! through the `mpi` crate (rsmpi over Open MPI or MPICH: the launcher, the rendezvous and the all-reduce are
//! MPI's, none of ours). `DistributedSteps` wraps a target's `Steps` with the reductions, so `Trainer::step`
//! keeps one path: a non-finite gradient on any rank makes the averaged gradient non-finite on every rank, and
//! the loss, the hit count and the state check are reduced too, so every rank's guard decides the same.

use std::sync::Arc;

use super::evaluate::EvalReport;
use super::optim::Optimizer;
use super::steps::{Checked, Steps};
use crate::data::Dataset;
use crate::data::loader::Batch;
use crate::data::transforms::Pipeline;
use crate::error::{Error, Result};
use crate::imaging::Image;
use crate::model::ResNet;

#[cfg(feature = "mpi")]
mod mpi;

/// What data-parallel training needs of a communicator. Every call is collective: every rank makes it, in the
/// same order, with buffers of the same length.
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place.
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Rank 0's values on every rank.
    fn broadcast_f32(&self, values: &mut [f32]) -> Result<()>;
    /// Every rank's `local` (all of one length), concatenated in rank order on rank 0; None on the others.
    fn gather_f32(&self, local: &[f32]) -> Result<Option<Vec<f32>>>;
}

/// One process: every reduction is the identity.
pub struct Alone;

impl Comm for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn gather_f32(&self, local: &[f32]) -> Result<Option<Vec<f32>>> {
        Ok(Some(local.to_vec()))
    }
}

/// The communicator of `train --distributed`: MPI's world, initialised once per process.
pub fn world() -> Result<Arc<dyn Comm>> {
    #[cfg(feature = "mpi")]
    {
        mpi::world()
    }
    #[cfg(not(feature = "mpi"))]
    Err(Error::invalid(
        "--distributed needs MPI, and this binary was built without it; rebuild with `cargo build --release \
         --features mpi` (Open MPI: Debian's libopenmpi-dev) and launch with `mpirun -n N resnet train --distributed`",
    ))
}

/// Whether any rank says yes (an interrupt on one rank stops all of them after the same step).
pub fn any(comm: &dyn Comm, local: bool) -> Result<bool> {
    let mut flag = [f64::from(u8::from(local))];
    comm.sum_f64(&mut flag)?;
    Ok(flag[0] > 0.0)
}

/// Every parameter compared bit for bit with rank 0's (through a 64-bit hash): the ranks' weights must be
/// identical after every step. (The BN running statistics move on each rank's own shard during a step and are
/// made rank 0's again at the next forward, as DDP's broadcast does.) `RESNET_DDP_CHECK=N` runs it every N steps
/// (debug runs and the tests).
pub fn check_identical(comm: &dyn Comm, model: &ResNet, step: u64) -> Result<()> {
    let hash = model
        .store
        .params
        .iter()
        .flat_map(|p| p.value.data().iter())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, v| (h ^ u64::from(v.to_bits())).wrapping_mul(0x1000_0000_01b3));
    // Three 22-bit pieces: each exact in an f32.
    let pieces = |h: u64| [0, 22, 44].map(|s| ((h >> s) & 0x3f_ffff) as f32);
    let mut root = pieces(hash);
    comm.broadcast_f32(&mut root)?;
    if any(comm, root != pieces(hash))? {
        return Err(Error::invalid(format!(
            "step {step}: the ranks' networks differ from rank 0's (this is rank {}): data-parallel state diverged",
            comm.rank()
        )));
    }
    Ok(())
}

/// Every trainable gradient averaged over the ranks, in one flat buffer: one all-reduce a step.
pub fn average_gradients(comm: &dyn Comm, model: &mut ResNet) -> Result<()> {
    let grads = model.store.params.iter_mut().filter(|p| p.trainable).filter_map(|p| p.grad.as_mut());
    let scale = 1.0 / comm.size() as f32;
    through_one_buffer(grads.collect(), |flat| {
        comm.sum_f32(flat)?;
        flat.iter_mut().for_each(|v| *v *= scale);
        Ok(())
    })
}

/// `collective` on the tensors laid end to end in one buffer (one call for the whole network, not one per
/// tensor), the result copied back into them.
fn through_one_buffer(
    tensors: Vec<&mut crate::engine::Tensor>,
    collective: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<()> {
    let mut flat = Vec::with_capacity(tensors.iter().map(|t| t.numel()).sum());
    for t in &tensors {
        flat.extend_from_slice(t.data());
    }
    collective(&mut flat)?;
    let mut at = 0;
    for t in tensors {
        let n = t.numel();
        t.data_mut().copy_from_slice(&flat[at..at + n]);
        at += n;
    }
    Ok(())
}

/// A target's steps with the data-parallel reductions around them.
pub struct DistributedSteps {
    pub inner: Box<dyn Steps>,
    pub comm: Arc<dyn Comm>,
}

impl DistributedSteps {
    /// Rank 0's BN running statistics on every rank.
    fn broadcast_buffers(&self, model: &mut ResNet) -> Result<()> {
        let buffers = model.store.buffers.iter_mut().map(|b| &mut b.value);
        through_one_buffer(buffers.collect(), |flat| self.comm.broadcast_f32(flat))
    }
}

impl Steps for DistributedSteps {
    fn device_name(&self) -> Option<String> {
        self.inner.device_name()
    }

    fn forward_backward(&mut self, model: &mut ResNet, batch: &Batch, keep_stats: bool) -> Result<Checked> {
        self.broadcast_buffers(model)?;
        let local = self.inner.forward_backward(model, batch, keep_stats)?;
        average_gradients(self.comm.as_ref(), model)?;
        // The loss as the mean over the ranks, the hits as their sum, the state finite only if it is everywhere.
        let mut scalars = [f64::from(local.loss), local.top1_hits as f64, f64::from(u8::from(!local.state_finite))];
        self.comm.sum_f64(&mut scalars)?;
        let n = self.comm.size() as f64;
        Ok(Checked {
            loss: (scalars[0] / n) as f32,
            top1_hits: scalars[1] as usize,
            grad_sumsq: self.inner.grad_sumsq(model)?,
            state_finite: scalars[2] == 0.0,
        })
    }

    fn drop_step(&mut self, model: &mut ResNet) -> Result<()> {
        self.inner.drop_step(model)
    }

    fn scale_gradients(&mut self, model: &mut ResNet, c: f32) -> Result<()> {
        self.inner.scale_gradients(model, c)
    }

    fn grad_sumsq(&self, model: &ResNet) -> Result<Vec<f64>> {
        self.inner.grad_sumsq(model)
    }

    fn update(
        &mut self,
        model: &mut ResNet,
        opt: &mut Optimizer,
        lr: f32,
        momentum: Option<f32>,
        monitor: bool,
    ) -> Result<Option<Vec<(f64, f64)>>> {
        self.inner.update(model, opt, lr, momentum, monitor)
    }

    fn diagnose(&mut self, model: &mut ResNet, batch: &Batch, check: &Checked) -> Result<String> {
        self.inner.diagnose(model, batch, check)
    }

    fn sync_host(&self, model: &mut ResNet, opt: &mut Optimizer) -> Result<()> {
        self.inner.sync_host(model, opt)
    }

    /// Each rank evaluates every `size`-th sample from its rank on (no padding, so every sample counts once),
    /// then the sums are reduced: the same loss, top-1/top-5 and confusion matrix as one process evaluating the
    /// whole split, in 1/N of the time. The per-sample predictions stay with their ranks (left empty here).
    fn evaluate(
        &self,
        model: &mut ResNet,
        ds: Arc<dyn Dataset>,
        pipe: Arc<Pipeline>,
        batch: usize,
        workers: usize,
    ) -> Result<EvalReport> {
        // Rank 0's running statistics, which the checkpoint holds, for every rank's evaluation.
        self.broadcast_buffers(model)?;
        let part = Arc::new(Strided { inner: ds, rank: self.comm.rank(), size: self.comm.size() });
        let n = part.len() as f64;
        let local = self.inner.evaluate(model, part, pipe, batch, workers)?;
        let classes = local.confusion.len();
        let mut sums = vec![local.loss * n, local.top1 * n, local.top5 * n, n];
        sums.extend(local.confusion.iter().flatten().map(|&c| c as f64));
        self.comm.sum_f64(&mut sums)?;
        let total = sums[3].max(1.0);
        let confusion: Vec<Vec<u64>> =
            sums[4..].chunks(classes.max(1)).map(|r| r.iter().map(|&c| c as u64).collect()).collect();
        Ok(EvalReport {
            loss: sums[0] / total,
            top1: sums[1] / total,
            top5: sums[2] / total,
            per_class: super::evaluate::per_class(&confusion),
            confusion,
            predictions: Vec::new(),
        })
    }
}

/// Samples `rank`, `rank + size`, `rank + 2·size`, … of a dataset: one rank's part of an evaluation.
struct Strided {
    inner: Arc<dyn Dataset>,
    rank: usize,
    size: usize,
}

impl Dataset for Strided {
    fn len(&self) -> usize {
        self.inner.len().saturating_sub(self.rank).div_ceil(self.size.max(1))
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn class_names(&self) -> Vec<String> {
        self.inner.class_names()
    }
    fn source(&self, i: usize) -> String {
        self.inner.source(self.rank + i * self.size)
    }
    fn get(&self, i: usize) -> Result<(Image, usize)> {
        self.inner.get(self.rank + i * self.size)
    }
}
