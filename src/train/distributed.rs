//! Data-parallel training, the way PyTorch DDP does it: every rank (one process; `mpirun -n N resnet train
//! --distributed`) holds the whole network, trains on its own shard of each epoch (`loader::Shard`, as
//! `DistributedSampler`, cut by steps), and the gradients are averaged over the ranks, so every rank applies the same update
//! to the same weights: in DDP's buckets (reverse parameter order, 1 MiB first, 25 MiB after), each bucket's
//! non-blocking all-reduce started as soon as backward has completed its gradients (`ResNet::
//! on_gradients_ready`), so communication overlaps the rest of backward. BN running statistics are broadcast
//! from rank 0 before every forward (DDP's `broadcast_buffers=True`), so the ranks' networks are identical
//! whenever one is evaluated or saved; `--sync-bn` (`RanksSum`) normalises over every rank's batch instead.
//!
//! Measured (bench/distributed.sh, 2 ranks on 2 cores): the overlap cuts the wait after backward from 5.7 % of
//! the CIFAR-stem step to 1-2 %, but not the step, because on shared cores the reduction's memory traffic runs
//! inside backward's MPI_Test calls on the same cores; across nodes the transfer is the network's, and hidden.
//!
//! `Comm` is the little the loop needs from a communicator; `mpi.rs` (feature `mpi`) implements it on MPI
//! through the `mpi` crate (rsmpi over Open MPI or MPICH: the launcher, the rendezvous and the all-reduce are
//! MPI's, none of ours). `DistributedSteps` wraps a target's `Steps` with the reductions, so `Trainer::step`
//! keeps one path: a non-finite gradient on any rank makes the averaged gradient non-finite on every rank, and
//! the loss, the hit count and the state check are reduced too, so every rank's guard decides the same.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::evaluate::EvalReport;
use super::optim::Optimizer;
use super::steps::{Checked, Steps};
use crate::data::Dataset;
use crate::data::loader::Batch;
use crate::data::transforms::Pipeline;
use crate::error::{Error, Result};
use crate::imaging::Image;
use crate::model::ResNet;
use crate::model::layers::ReplicaSum;
use crate::model::store::{ParamId, Store};

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
    /// Start an element-wise sum over the ranks and return at once (MPI_Iallreduce): the rest of backward runs
    /// while it is under way.
    fn start_sum_f32(&self, values: Vec<f32>) -> Box<dyn PendingSum>;
}

/// A sum that `Comm::start_sum_f32` started.
pub trait PendingSum: Send {
    /// Let the sum progress (MPI moves a non-blocking collective on inside its own calls); true once it is done.
    fn test(&mut self) -> bool;
    /// The sum, once every rank has contributed.
    fn wait(self: Box<Self>) -> Result<Vec<f32>>;
}

/// A sum with nothing to wait for (one process).
struct Done(Vec<f32>);

impl PendingSum for Done {
    fn test(&mut self) -> bool {
        true
    }
    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        Ok(self.0)
    }
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
    fn start_sum_f32(&self, values: Vec<f32>) -> Box<dyn PendingSum> {
        Box::new(Done(values))
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

/// The ranks' sum for batch norm over the global batch (`--sync-bn`). A collective that fails is fatal here
/// as in MPI itself (its default error handler aborts the job; a hang ends in the watchdog's exit 3), so the
/// layer's forward and backward need no error path.
pub struct RanksSum(pub Arc<dyn Comm>);

impl ReplicaSum for RanksSum {
    fn sum(&self, values: &mut [f64]) {
        if let Err(e) = self.0.sum_f64(values) {
            eprintln!("error: rank {}: {e}", self.0.rank());
            std::process::exit(3);
        }
    }
    fn replicas(&self) -> usize {
        self.0.size()
    }
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

/// DDP's bucket sizes: the first bucket (the classifier and the last layers, whose gradients are ready first)
/// small so that its all-reduce starts early, the others large enough that each all-reduce moves at full
/// bandwidth (PyTorch's `bucket_cap_mb = 25`, first bucket 1 MiB).
const FIRST_BUCKET_BYTES: usize = 1 << 20;
const BUCKET_BYTES: usize = 25 << 20;

/// The trainable gradients in buckets, in reverse parameter order (the order backward completes them), each
/// all-reduced as soon as its last gradient is complete while backward goes on, and all of them in bucket
/// order on every rank (collectives must be issued in one order everywhere). `finish` then waits for the
/// sums and writes the averages back.
struct Buckets {
    comm: Arc<dyn Comm>,
    /// Store indices of each bucket's parameters.
    members: Vec<Vec<usize>>,
    bucket_of: Vec<Option<usize>>,
    /// Per bucket: its parameters whose gradient this backward has not completed yet.
    missing: Vec<usize>,
    /// The sums started this step, in bucket order (so the next bucket to start is `started.len()`).
    started: Vec<Box<dyn PendingSum>>,
}

impl Buckets {
    fn of(store: &Store, comm: Arc<dyn Comm>) -> Buckets {
        let mut members: Vec<Vec<usize>> = Vec::new();
        let mut bytes = usize::MAX;
        for (i, p) in store.params.iter().enumerate().rev().filter(|(_, p)| p.trainable) {
            let cap = if members.len() <= 1 { FIRST_BUCKET_BYTES } else { BUCKET_BYTES };
            if bytes >= cap || members.is_empty() {
                members.push(Vec::new());
                bytes = 0;
            }
            members.last_mut().expect("a bucket was just opened").push(i);
            bytes += 4 * p.value.numel();
        }
        let mut bucket_of = vec![None; store.params.len()];
        for (b, m) in members.iter().enumerate() {
            m.iter().for_each(|&i| bucket_of[i] = Some(b));
        }
        let missing = members.iter().map(Vec::len).collect();
        Buckets { comm, members, bucket_of, missing, started: Vec::new() }
    }

    /// Backward completed these gradients: start every bucket now complete (in order), let the others progress.
    fn ready(&mut self, store: &Store, ids: &[ParamId]) {
        for id in ids {
            if let Some(b) = self.bucket_of[id.index()] {
                self.missing[b] = self.missing[b].saturating_sub(1);
            }
        }
        while self.started.len() < self.members.len() && self.missing[self.started.len()] == 0 {
            self.start_next(store);
        }
        for pending in &mut self.started {
            pending.test();
        }
    }

    fn start_next(&mut self, store: &Store) {
        let members = &self.members[self.started.len()];
        let mut flat = Vec::with_capacity(members.iter().map(|&i| store.params[i].value.numel()).sum());
        for &i in members {
            let p = &store.params[i];
            match &p.grad {
                Some(g) => flat.extend_from_slice(g.data()),
                None => flat.resize(flat.len() + p.value.numel(), 0.0),
            }
        }
        self.started.push(self.comm.start_sum_f32(flat));
    }

    /// After backward: the buckets not started yet started, every sum waited for, the averages written back.
    fn finish(&mut self, store: &mut Store) -> Result<()> {
        while self.started.len() < self.members.len() {
            self.start_next(store);
        }
        self.missing = self.members.iter().map(Vec::len).collect();
        let scale = 1.0 / self.comm.size() as f32;
        for (members, pending) in self.members.iter().zip(std::mem::take(&mut self.started)) {
            let sum = pending.wait()?;
            let mut at = 0;
            for &i in members {
                let p = &mut store.params[i];
                let n = p.value.numel();
                if let Some(g) = p.grad.as_mut() {
                    g.data_mut().iter_mut().zip(&sum[at..at + n]).for_each(|(d, &v)| *d = v * scale);
                }
                at += n;
            }
        }
        Ok(())
    }
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
    inner: Box<dyn Steps>,
    comm: Arc<dyn Comm>,
    buckets: Arc<Mutex<Buckets>>,
    /// Time spent after backward waiting for the gradients' sums (what the overlap did not hide), since start.
    pub exposed_communication: Duration,
}

/// The buckets, also when a panic elsewhere poisoned their lock (their state is whole between calls).
fn locked(buckets: &Mutex<Buckets>) -> MutexGuard<'_, Buckets> {
    buckets.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DistributedSteps {
    /// `inner` with the reductions over `comm`'s ranks; `model`'s backward from now on starts each bucket's
    /// all-reduce as soon as its gradients are complete.
    pub fn new(inner: Box<dyn Steps>, comm: Arc<dyn Comm>, model: &mut ResNet) -> DistributedSteps {
        let buckets = Arc::new(Mutex::new(Buckets::of(&model.store, comm.clone())));
        let hook = buckets.clone();
        // RESNET_DDP_OVERLAP=0 starts every bucket after backward instead (for bench/distributed.sh to show
        // what the overlap hides).
        let overlap = std::env::var("RESNET_DDP_OVERLAP").map_or(true, |v| v != "0");
        model.on_gradients_ready(
            overlap.then(|| Box::new(move |store: &Store, ids: &[ParamId]| locked(&hook).ready(store, ids)) as _),
        );
        DistributedSteps { inner, comm, buckets, exposed_communication: Duration::ZERO }
    }

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
        let waited = Instant::now();
        locked(&self.buckets).finish(&mut model.store)?;
        self.exposed_communication += waited.elapsed();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FAMILY, ResNetConfig};

    #[test]
    fn buckets_follow_ddp_reverse_order_and_sizes() {
        let model = ResNet::new(ResNetConfig::new(FAMILY[1], 10), 0);
        let b = Buckets::of(&model.store, Arc::new(Alone));
        let bytes = |m: &[usize]| m.iter().map(|&i| 4 * model.store.params[i].value.numel()).sum::<usize>();
        // fc first (its gradient is complete first), then backwards through the store.
        assert_eq!(model.store.params[b.members[0][0]].name, "fc.bias");
        let order: Vec<usize> = b.members.iter().flatten().copied().collect();
        assert_eq!(order, (0..model.store.params.len()).rev().collect::<Vec<_>>(), "every parameter once");
        // Each bucket closes once it holds its cap: 1 MiB for the first, 25 MiB after (ResNet-34: 87 MB in 4).
        assert!(bytes(&b.members[0]) >= FIRST_BUCKET_BYTES);
        assert!(b.members[1..b.members.len() - 1].iter().all(|m| bytes(m) >= BUCKET_BYTES));
        assert_eq!(b.members.len(), 4);
    }
}
