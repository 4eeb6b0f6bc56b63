//! The training loop's device reductions (`cu/train_loop.cu`): per-buffer sums of squares in double through
//! pointer tables, the loss/top-1 read, and one scaling launch over many buffers; plus `LoopState`, the buffers
//! those read into (labels, the read-back array, the tables, the snapshots). The loop service that drives them
//! over a trainer's buffers is `exec::cuda::loop_ops`.
//!
//! The reductions sum in double, one block per buffer, each thread a fixed stride and then a fixed tree, so a
//! result does not change from run to run. Pointer tables (one `u64` address and one length per buffer) are
//! uploaded once: every buffer keeps its address for the trainer's life.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};

use super::super::device::{Buf, Device, cuda_err, load_kernels};
use super::half::{ActRef, mixed};
use super::kernels::int;
use crate::error::{Error, Result};

const THREADS: u32 = 256;

const SOURCE: &str = include_str!("../cu/train_loop.cu");

pub(crate) struct LoopKernels {
    _module: Arc<CudaModule>,
    sum_squares: CudaFunction,
    sum_squares_bf16: CudaFunction,
    loss_hits: CudaFunction,
    scale_all: CudaFunction,
}

impl LoopKernels {
    pub(crate) fn load(dev: &Device) -> Result<LoopKernels> {
        let (module, f) = load_kernels(dev, SOURCE, "the training loop's kernels")?;
        Ok(LoopKernels {
            sum_squares: f("sum_squares")?,
            sum_squares_bf16: f("sum_squares_bf16")?,
            loss_hits: f("loss_hits")?,
            scale_all: f("scale_all")?,
            _module: module,
        })
    }

    /// out[0] = the loss (read from `loss`), out[1] = how many of the first `n` rows of `classes` logits have
    /// their maximum at `labels[row]`, enqueued.
    pub(crate) fn loss_hits(
        &self,
        dev: &Device,
        logits: &Buf<f32>,
        labels: &Buf<i32>,
        loss: &Buf<f32>,
        (n, classes): (usize, usize),
        out: &Buf<f64>,
    ) -> Result<()> {
        let fits = logits.len >= n * classes && labels.len >= n && loss.len >= 1 && out.len >= 2;
        assert!(fits, "CUDA: loss_hits buffers too small (a bug in the caller)");
        let (ni, ci) = (int(n)?, int(classes)?);
        let mut b = dev.stream.launch_builder(&self.loss_hits);
        b.arg(&logits.ptr).arg(&labels.ptr).arg(&loss.ptr).arg(&ni).arg(&ci).arg(&out.ptr);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match loss_hits (const float*, const int*, const float*, two int, double*); rows below
        // n of `classes` logits, labels below n, loss[0] and out[0..2], all inside their buffers (checked above).
        unsafe { b.launch(cfg) }.map(drop).map_err(cuda_err("loss_hits"))
    }

    /// Multiply every buffer of `table` by `c` (none: nothing launched); `longest` is the longest buffer's length.
    /// Enqueued.
    pub(crate) fn scale_all(&self, dev: &Device, table: &Table, c: f32, longest: usize) -> Result<()> {
        if table.count == 0 {
            return Ok(());
        }
        let mut b = dev.stream.launch_builder(&self.scale_all);
        b.arg(&table.ptrs.ptr).arg(&table.lens.ptr).arg(&c);
        let blocks = longest.div_ceil(THREADS as usize).clamp(1, 1024) as u32;
        let cfg =
            LaunchConfig { grid_dim: (blocks, table.count as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match scale_all (float* const*, const long long*, float); block row y scales table[y]
        // below lens[y], which that buffer holds (`Table::of` checked it); rows are distinct buffers.
        unsafe { b.launch(cfg) }.map(drop).map_err(cuda_err("scale_all"))
    }
}

/// Addresses and lengths of a list of buffers (all fp32, or all bf16), on the device.
pub(crate) struct Table {
    pub(crate) ptrs: Buf<u64>,
    pub(crate) lens: Buf<i64>,
    pub(crate) count: usize,
    pub(crate) bf16: bool,
}

impl Table {
    pub(crate) fn new(dev: &Device, bufs: &[(&Buf<f32>, usize)]) -> Result<Table> {
        Self::of(dev, &bufs.iter().map(|&(b, n)| (ActRef::F32(b), n)).collect::<Vec<_>>())
    }

    pub(crate) fn of(dev: &Device, bufs: &[(ActRef, usize)]) -> Result<Table> {
        if bufs.iter().any(|(b, n)| b.len() < *n) {
            return Err(Error::invalid("CUDA: a reduction table names more values than a buffer holds"));
        }
        let bf16 = bufs.iter().any(|(b, _)| matches!(b, ActRef::Bf16(_)));
        if bf16 && !bufs.iter().all(|(b, _)| matches!(b, ActRef::Bf16(_))) {
            return Err(mixed("a reduction table"));
        }
        let ptrs: Vec<u64> = bufs.iter().map(|(b, _)| b.ptr()).collect();
        let lens: Vec<i64> = bufs.iter().map(|(_, n)| *n as i64).collect();
        Ok(Table { ptrs: dev.upload(&ptrs)?, lens: dev.upload(&lens)?, count: bufs.len(), bf16 })
    }

    /// out[offset + k] = Σ table[k]² (or Σ (table[k] − minus[k])²), enqueued.
    pub(crate) fn sum_squares(
        &self,
        dev: &Device,
        k: &LoopKernels,
        minus: Option<&Table>,
        out: &Buf<f64>,
        offset: usize,
    ) -> Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let bad_minus = minus.is_some_and(|m| m.count != self.count || m.bf16 || self.bf16);
        if out.len < offset + self.count || bad_minus {
            return Err(Error::invalid("CUDA: reduction output too small"));
        }
        let minus = minus.map_or(0u64, |m| m.ptrs.ptr);
        let at = out.ptr + (offset * std::mem::size_of::<f64>()) as u64;
        let cfg = LaunchConfig { grid_dim: (self.count as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        if self.bf16 {
            let mut b = dev.stream.launch_builder(&k.sum_squares_bf16);
            b.arg(&self.ptrs.ptr).arg(&self.lens.ptr).arg(&at);
            // SAFETY: arguments match sum_squares_bf16 (two pointer tables, double*); as below, over bf16 buffers
            // (`Table::of` checked every entry is one and holds lens[k] values).
            return unsafe { b.launch(cfg) }.map(drop).map_err(cuda_err("sum_squares_bf16"));
        }
        let mut b = dev.stream.launch_builder(&k.sum_squares);
        b.arg(&self.ptrs.ptr).arg(&minus).arg(&self.lens.ptr).arg(&at);
        // SAFETY: arguments match sum_squares (three pointer tables, double*); block k reads table[k] (and
        // minus[k], a table of as many fp32 buffers of the same lengths, or null) below lens[k], which `Table::of`
        // checked each buffer holds; it writes out[offset + k], inside `out` (checked above). THREADS matches the
        // kernel's #define.
        unsafe { b.launch(cfg) }.map(drop).map_err(cuda_err("sum_squares"))
    }
}

/// The loop's device state: labels, the read-back array, the tables, and the snapshots.
pub(crate) struct LoopState {
    /// The batch of the last `forward_backward`.
    pub(crate) last_batch: usize,
    pub(crate) labels: Buf<i32>,
    /// [loss, top-1 hits, Σg² per trainable parameter, Σx² per BN buffer], or [Σw², Σ(w − w₀)²] per trainable
    /// parameter for the monitor.
    pub(crate) out: Buf<f64>,
    /// Parameter indices of the trainable parameters, in the store's order.
    pub(crate) trainable: Vec<usize>,
    pub(crate) grads: Table,
    pub(crate) weights: Table,
    pub(crate) buffers: Table,
    /// BN running statistics (and the batch count) before the last forward, when the loop asked for them.
    pub(crate) stats_copy: Vec<Buf<f32>>,
    pub(crate) tracked_copy: i64,
    /// The trainable weights before the last update the monitor looks at, allocated on the monitor's first step.
    pub(crate) weights_copy: Option<(Vec<Buf<f32>>, Table)>,
}

impl LoopState {
    /// `tensors`: parameters then buffers, as the trainer holds them; `grads` and `trainable` per parameter.
    pub(crate) fn new(
        dev: &Device,
        batch: usize,
        tensors: &[Buf<f32>],
        grads: &[Buf<f32>],
        trainable: &[bool],
    ) -> Result<LoopState> {
        let params = grads.len();
        let trainable: Vec<usize> = (0..params).filter(|&i| trainable[i]).collect();
        let grads = Table::new(dev, &trainable.iter().map(|&i| (&grads[i], grads[i].len)).collect::<Vec<_>>())?;
        let weights = Table::new(dev, &trainable.iter().map(|&i| (&tensors[i], tensors[i].len)).collect::<Vec<_>>())?;
        let buffers = Table::new(dev, &tensors[params..].iter().map(|b| (b, b.len)).collect::<Vec<_>>())?;
        let out_len = (2 + trainable.len() + buffers.count).max(2 * trainable.len());
        Ok(LoopState {
            last_batch: 0,
            labels: dev.zeros(batch)?,
            out: dev.zeros(out_len)?,
            stats_copy: Vec::new(),
            tracked_copy: 0,
            weights_copy: None,
            trainable,
            grads,
            weights,
            buffers,
        })
    }
}
