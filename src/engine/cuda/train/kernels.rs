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

const SOURCE: &str = r#"
#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// ReLU as the CPU's relu1: negative to 0, NaN kept.
__device__ __forceinline__ float relu1(float v) { return v < 0.0f ? 0.0f : v; }
// The CPU's relu_backward: the gradient is dropped where the ReLU's output is <= 0 (and kept where it is NaN).
__device__ __forceinline__ float keep(float g, float out) { return out <= 0.0f ? 0.0f : g; }

// a = relu(a), in place.
extern "C" __global__ void relu_fwd(float* a, long long n) {
    float4* a4 = reinterpret_cast<float4*>(a);
    GRID_STRIDE(i, n / 4) {
        float4 v = a4[i];
        v.x = relu1(v.x); v.y = relu1(v.y); v.z = relu1(v.z); v.w = relu1(v.w);
        a4[i] = v;
    }
    GRID_STRIDE(j, n % 4) { long long i = n / 4 * 4 + j; a[i] = relu1(a[i]); }
}

// a = relu(a + r), in place: the residual join.
extern "C" __global__ void add_relu_fwd(float* a, const float* r, long long n) {
    float4* a4 = reinterpret_cast<float4*>(a);
    const float4* r4 = reinterpret_cast<const float4*>(r);
    GRID_STRIDE(i, n / 4) {
        float4 v = a4[i], w = r4[i];
        v.x = relu1(v.x + w.x); v.y = relu1(v.y + w.y); v.z = relu1(v.z + w.z); v.w = relu1(v.w + w.w);
        a4[i] = v;
    }
    GRID_STRIDE(j, n % 4) { long long i = n / 4 * 4 + j; a[i] = relu1(a[i] + r[i]); }
}

// g = g masked by the ReLU output y, in place.
extern "C" __global__ void relu_mask(float* g, const float* y, long long n) {
    float4* g4 = reinterpret_cast<float4*>(g);
    const float4* y4 = reinterpret_cast<const float4*>(y);
    GRID_STRIDE(i, n / 4) {
        float4 v = g4[i], o = y4[i];
        v.x = keep(v.x, o.x); v.y = keep(v.y, o.y); v.z = keep(v.z, o.z); v.w = keep(v.w, o.w);
        g4[i] = v;
    }
    GRID_STRIDE(j, n % 4) { long long i = n / 4 * 4 + j; g[i] = keep(g[i], y[i]); }
}

// 3x3 max-pool, stride 2, padding 1, recording the winner's index within its plane: the first maximum in scan
// order, NaN winning, as the CPU engine (and PyTorch).
extern "C" __global__ void max_pool_fwd(const float* x, float* y, int* arg, long long planes, int h, int w,
                                        int oh, int ow) {
    GRID_STRIDE(i, planes * oh * ow) {
        int ox = (int)(i % ow);
        int oy = (int)((i / ow) % oh);
        const float* p = x + (i / ((long long)ow * oh)) * h * w;
        float best = 0.0f;
        int at = 0;
        bool first = true;
        for (int iy = max(oy * 2 - 1, 0); iy < min(oy * 2 + 2, h); ++iy) {
            for (int ix = max(ox * 2 - 1, 0); ix < min(ox * 2 + 2, w); ++ix) {
                float v = p[iy * w + ix];
                if (first || v > best || v != v) { best = v; at = iy * w + ix; first = false; }
            }
        }
        y[i] = best;
        arg[i] = at;
    }
}

// The max-pool's input gradient, gathered (each input takes the outputs whose window chose it, in output order,
// as the CPU's scatter adds them), then masked by the ReLU output y that fed the pool.
extern "C" __global__ void max_pool_bwd(const float* dy, const int* arg, const float* y, float* dx, long long planes,
                                        int h, int w, int oh, int ow) {
    GRID_STRIDE(i, planes * h * w) {
        int ix = (int)(i % w);
        int iy = (int)((i / w) % h);
        long long base = (i / ((long long)w * h)) * oh * ow;
        int me = iy * w + ix;
        float s = 0.0f;
        for (int oy = iy / 2; oy <= min((iy + 1) / 2, oh - 1); ++oy) {
            for (int ox = ix / 2; ox <= min((ix + 1) / 2, ow - 1); ++ox) {
                long long o = base + oy * ow + ox;
                if (arg[o] == me) s += dy[o];
            }
        }
        dx[i] = keep(s, y[i]);
    }
}

// The global average pool's input gradient dy[plane]/HW, masked by the ReLU output y it pooled.
extern "C" __global__ void avg_pool_bwd(const float* dy, const float* y, float* dx, long long total, int plane) {
    GRID_STRIDE(i, total) { dx[i] = keep(dy[i / plane] / (float)plane, y[i]); }
}

// Softmax cross-entropy against target rows q, as the CPU engine (in double): loss = mean_r −Σ q·log p and
// dlogits = (p·Σq − q)/N. One block: warp w takes rows w, w + warps, ...; the loss is summed in a fixed order.
// Then, after the block's barrier, the column sums of dlogits: the fc bias gradient.
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
extern "C" __global__ void softmax_xent(const float* logits, const float* q, float* grad, float* bias_grad,
                                        float* loss, int n, int c) {
    __shared__ double partial[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    double acc = 0.0;
    for (int r = warp; r < n; r += warps) {
        const float* z = logits + (long long)r * c;
        const float* t = q + (long long)r * c;
        double m = __longlong_as_double(0xfff0000000000000ULL); // -inf
        for (int j = lane; j < c; j += 32) m = fmax(m, (double)z[j]);
        for (int o = 16; o > 0; o /= 2) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
        double e = 0.0, qs = 0.0;
        for (int j = lane; j < c; j += 32) { e += exp((double)z[j] - m); qs += (double)t[j]; }
        double log_z = m + log(warp_sum(e));
        qs = warp_sum(qs);
        double l = 0.0;
        for (int j = lane; j < c; j += 32) {
            double log_p = (double)z[j] - log_z;
            l -= (double)t[j] * log_p;
            grad[(long long)r * c + j] = (float)((exp(log_p) * qs - (double)t[j]) / (double)n);
        }
        acc += warp_sum(l);
    }
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int k = 0; k < warps; ++k) total += partial[k];
        loss[0] = (float)(total / (double)(n > 0 ? n : 1));
    }
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float s = 0.0f;
        for (int r = 0; r < n; ++r) s += grad[(long long)r * c + j];
        bias_grad[j] = s;
    }
}

// One SGD step of one parameter, torch's single-tensor order: d = g (+ wd·w); with momentum m, buf = d on the
// first step and buf·m + d after, d = nesterov ? d + m·buf : buf; w += −lr·d. Rounded as the CPU rounds.
extern "C" __global__ void sgd(float* w, const float* g, float* buf, long long n, float neg_lr, float wd, float m,
                               int nesterov, int first) {
    GRID_STRIDE(i, n) {
        float p = w[i];
        float d = wd != 0.0f ? __fadd_rn(g[i], __fmul_rn(wd, p)) : g[i];
        if (m != 0.0f) {
            float b = first ? d : __fadd_rn(__fmul_rn(buf[i], m), d);
            buf[i] = b;
            d = nesterov ? __fadd_rn(d, __fmul_rn(m, b)) : b;
        }
        w[i] = __fadd_rn(p, __fmul_rn(neg_lr, d));
    }
}
"#;

const THREADS: u32 = 256;

fn launch(total: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (total.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A size as the `int` a kernel, cuDNN or cuBLAS takes.
pub(super) fn int(v: usize) -> Result<i32> {
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
