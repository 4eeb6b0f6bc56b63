//! The training kernels cuDNN and cuBLAS do not cover, compiled once per trainer with NVRTC: ReLU, the residual
//! join, the ReLU masks of backward, max-pool 3x3/2 with its argmax and its gradient, the average pool's gradient,
//! softmax cross-entropy with its gradient, and the SGD update.
//!
//! The elementwise kernels read and write float4 (every buffer starts an allocation, so it is 16-byte aligned)
//! with a scalar tail. Where the CPU engine's arithmetic is reproducible bit for bit cheaply (ReLU, masks,
//! pooling, SGD), the kernels do the same operations in the same order, with `__fmul_rn`/`__fadd_rn` where the
//! compiler would otherwise contract into an FMA.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};

use super::super::device::{Buf, Device, cuda_err, load_kernels};
use crate::error::{Error, Result};

const SOURCE: &str = include_str!("../cu/train_f32.cu");

const THREADS: u32 = 256;

fn launch(total: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (total.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A size as the `int` a kernel, cuDNN or cuBLAS takes.
pub(crate) fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("CUDA: size {v} is too large for a 32-bit argument")))
}

// A buffer smaller than its launch needs is a bug in the caller, not bad input: panic before the launch.
fn fits(what: &str, bufs: &[(&Buf<f32>, usize)]) -> Result<()> {
    assert!(bufs.iter().all(|(b, n)| b.len >= *n), "CUDA: buffer too small for {what}");
    Ok(())
}

/// SGD hyperparameters of one parameter's update, as the kernel takes them.
#[derive(Clone, Copy)]
pub struct SgdArgs {
    pub neg_lr: f32,
    pub weight_decay: f32,
    pub momentum: f32,
    pub nesterov: bool,
    pub first: bool,
}

pub struct TrainKernels {
    _module: Arc<CudaModule>,
    relu: CudaFunction,
    add_relu: CudaFunction,
    mask: CudaFunction,
    pool_fwd: CudaFunction,
    pool_bwd: CudaFunction,
    avg_bwd: CudaFunction,
    xent: CudaFunction,
    sgd: CudaFunction,
}

impl TrainKernels {
    pub fn load(dev: &Device) -> Result<TrainKernels> {
        let (module, f) = load_kernels(dev, SOURCE, "the training kernels")?;
        Ok(TrainKernels {
            relu: f("relu_fwd")?,
            add_relu: f("add_relu_fwd")?,
            mask: f("relu_mask")?,
            pool_fwd: f("max_pool_fwd")?,
            pool_bwd: f("max_pool_bwd")?,
            avg_bwd: f("avg_pool_bwd")?,
            xent: f("softmax_xent")?,
            sgd: f("sgd")?,
            _module: module,
        })
    }

    /// a = relu(a), or relu(a + r) with a residual, over `n` floats.
    pub fn relu(&self, dev: &Device, a: &Buf<f32>, residual: Option<&Buf<f32>>, n: usize) -> Result<()> {
        fits("relu", &[(a, n)])?;
        let len = n as i64;
        let mut b;
        match residual {
            None => {
                b = dev.stream.launch_builder(&self.relu);
                b.arg(&a.ptr);
            }
            Some(r) => {
                fits("relu", &[(r, n)])?;
                b = dev.stream.launch_builder(&self.add_relu);
                b.arg(&a.ptr).arg(&r.ptr);
            }
        }
        b.arg(&len);
        // SAFETY: the arguments match relu_fwd (float*, long long) or add_relu_fwd (float*, const float*, long
        // long); every index is below n, which a (and r) hold; float4 accesses stay below n/4·4 and the buffers
        // are allocation starts, so 16-byte aligned. a and r are distinct buffers.
        unsafe { b.launch(launch(n / 4 + 1)) }.map(drop).map_err(cuda_err("relu"))
    }

    /// g = g masked by the ReLU output y (in place), over `n` floats.
    pub fn mask(&self, dev: &Device, g: &Buf<f32>, y: &Buf<f32>, n: usize) -> Result<()> {
        fits("relu_mask", &[(g, n), (y, n)])?;
        let len = n as i64;
        let mut b = dev.stream.launch_builder(&self.mask);
        b.arg(&g.ptr).arg(&y.ptr).arg(&len);
        // SAFETY: arguments match relu_mask (float*, const float*, long long); indices below n, which both hold;
        // both are allocation starts (16-byte aligned for the float4 part).
        unsafe { b.launch(launch(n / 4 + 1)) }.map(drop).map_err(cuda_err("relu_mask"))
    }

    /// Max-pool 3x3/2/p1 of x (`dims`) into y (`[N, C, oh, ow]`) with the winners' indices in `arg`.
    pub fn max_pool(
        &self,
        dev: &Device,
        x: &Buf<f32>,
        y: &Buf<f32>,
        arg: &Buf<i32>,
        dims: [usize; 4],
        (oh, ow): (usize, usize),
    ) -> Result<()> {
        let [n, c, h, w] = dims;
        let out = n * c * oh * ow;
        fits("max_pool", &[(x, n * c * h * w), (y, out)])?;
        if arg.len < out {
            return Err(Error::invalid("CUDA: buffer too small for max_pool"));
        }
        let planes = (n * c) as i64;
        let (h, w, oh, ow) = (int(h)?, int(w)?, int(oh)?, int(ow)?);
        let mut b = dev.stream.launch_builder(&self.pool_fwd);
        b.arg(&x.ptr).arg(&y.ptr).arg(&arg.ptr).arg(&planes).arg(&h).arg(&w).arg(&oh).arg(&ow);
        // SAFETY: arguments match max_pool_fwd (const float*, float*, int*, long long, four int); outputs are
        // indexed below planes·oh·ow (y and arg hold that many) and inputs below planes·h·w within the clipped
        // window (checked above).
        unsafe { b.launch(launch(out)) }.map(drop).map_err(cuda_err("max_pool"))
    }

    /// dx (`dims`) of the max-pool from dy (`[N, C, oh, ow]`) and the recorded winners, masked by the pool's
    /// input y (a ReLU output).
    #[allow(clippy::too_many_arguments)]
    pub fn max_pool_backward(
        &self,
        dev: &Device,
        dy: &Buf<f32>,
        arg: &Buf<i32>,
        y: &Buf<f32>,
        dx: &Buf<f32>,
        dims: [usize; 4],
        (oh, ow): (usize, usize),
    ) -> Result<()> {
        let [n, c, h, w] = dims;
        let total = n * c * h * w;
        fits("max_pool_backward", &[(dy, n * c * oh * ow), (y, total), (dx, total)])?;
        if arg.len < n * c * oh * ow || oh == 0 || ow == 0 {
            return Err(Error::invalid("CUDA: buffer too small for max_pool_backward"));
        }
        let planes = (n * c) as i64;
        let (h, w, oh, ow) = (int(h)?, int(w)?, int(oh)?, int(ow)?);
        let mut b = dev.stream.launch_builder(&self.pool_bwd);
        b.arg(&dy.ptr).arg(&arg.ptr).arg(&y.ptr).arg(&dx.ptr).arg(&planes).arg(&h).arg(&w).arg(&oh).arg(&ow);
        // SAFETY: arguments match max_pool_bwd (const float*, const int*, const float*, float*, long long, four
        // int); inputs and dx are indexed below planes·h·w, dy and arg below planes·oh·ow (oy, ox clipped to
        // oh−1, ow−1), all checked above.
        unsafe { b.launch(launch(total)) }.map(drop).map_err(cuda_err("max_pool_backward"))
    }

    /// dx (`dims`) = dy[n, c] / (H·W) masked by the pooled ReLU output y.
    pub fn avg_pool_backward(
        &self,
        dev: &Device,
        dy: &Buf<f32>,
        y: &Buf<f32>,
        dx: &Buf<f32>,
        dims: [usize; 4],
    ) -> Result<()> {
        let [n, c, h, w] = dims;
        let total = n * c * h * w;
        fits("avg_pool_backward", &[(dy, n * c), (y, total), (dx, total)])?;
        let (len, plane) = (total as i64, int(h * w)?);
        if plane == 0 {
            return Err(Error::invalid("CUDA: empty plane in avg_pool_backward"));
        }
        let mut b = dev.stream.launch_builder(&self.avg_bwd);
        b.arg(&dy.ptr).arg(&y.ptr).arg(&dx.ptr).arg(&len).arg(&plane);
        // SAFETY: arguments match avg_pool_bwd (const float*, const float*, float*, long long, int); y and dx are
        // indexed below total, dy below total/plane = N·C, all checked above.
        unsafe { b.launch(launch(total)) }.map(drop).map_err(cuda_err("avg_pool_backward"))
    }

    /// Mean softmax cross-entropy of `logits` against `targets` (`[n, c]` each) into loss[0], its gradient into
    /// `grad` and the gradient's column sums (the fc bias gradient) into `bias_grad`.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_xent(
        &self,
        dev: &Device,
        logits: &Buf<f32>,
        targets: &Buf<f32>,
        grad: &Buf<f32>,
        bias_grad: &Buf<f32>,
        loss: &Buf<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        fits("softmax_xent", &[(logits, n * c), (targets, n * c), (grad, n * c), (bias_grad, c), (loss, 1)])?;
        let (ni, ci) = (int(n)?, int(c)?);
        let mut b = dev.stream.launch_builder(&self.xent);
        b.arg(&logits.ptr).arg(&targets.ptr).arg(&grad.ptr).arg(&bias_grad.ptr).arg(&loss.ptr).arg(&ni).arg(&ci);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match softmax_xent (two const float*, three float*, two int); one block of 1024
        // threads (32 whole warps, so every shuffle sees 32 lanes: a warp's row loop is uniform across it);
        // rows are indexed below n and columns below c, which every buffer holds (checked above).
        unsafe { b.launch(cfg) }.map(drop).map_err(cuda_err("softmax_xent"))
    }

    /// One SGD update of `n` values of w from g, with momentum buffer `buf`.
    pub fn sgd(&self, dev: &Device, w: &Buf<f32>, g: &Buf<f32>, buf: &Buf<f32>, n: usize, a: SgdArgs) -> Result<()> {
        fits("sgd", &[(w, n), (g, n), (buf, n)])?;
        let (len, nesterov, first) = (n as i64, i32::from(a.nesterov), i32::from(a.first));
        let mut b = dev.stream.launch_builder(&self.sgd);
        b.arg(&w.ptr).arg(&g.ptr).arg(&buf.ptr).arg(&len);
        b.arg(&a.neg_lr).arg(&a.weight_decay).arg(&a.momentum).arg(&nesterov).arg(&first);
        // SAFETY: arguments match sgd (float*, const float*, float*, long long, three float, two int); indices
        // stay below n, which w, g and buf hold (checked above).
        unsafe { b.launch(launch(n)) }.map(drop).map_err(cuda_err("sgd"))
    }
}
