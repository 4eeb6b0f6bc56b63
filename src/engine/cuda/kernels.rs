//! The small kernels cuDNN and cuBLAS do not cover, compiled once per executor with NVRTC: batch-norm folding, the
//! fused scale/shift + residual + ReLU that follows every convolution, max-pool 3x3/2, global average pool, and the
//! linear layer's bias; for bf16 storage, the same on NHWC bf16 tensors plus the fp32 NCHW → bf16 NHWC conversion.
//!
//! bf16 values travel as `unsigned short` bit patterns (`u16` buffers on the host side) and are converted by bit
//! operations, so the source needs no CUDA header and compiles with any NVRTC; arithmetic is fp32.
//!
//! Every kernel takes raw device addresses (`u64`, the width of a device pointer) and element counts, and guards
//! every access by those counts; the launch wrappers check the counts against the buffers' lengths first, which is
//! the invariant each `unsafe` launch relies on.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};

use super::device::{Buf, Device, cuda_err};
use crate::error::{Error, Result};

const SOURCE_F32: &str = include_str!("cu/inference_f32.cu");

/// bf16 as `unsigned short` bits and its two conversions, shared with the training kernels (`train/half.rs`).
pub(crate) const BF16: &str = include_str!("cu/bf16.cuh");

const SOURCE_BF16: &str = include_str!("cu/inference_bf16.cu");

const THREADS: u32 = 256;

/// A grid-stride launch over `total` items: enough blocks to cover them, capped (the kernels loop).
fn grid(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn i32_of(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("CUDA: size {v} is too large for a kernel argument")))
}

// A buffer smaller than its launch needs is a bug in the caller, not bad input: panic before the launch.
fn check(what: &str, ok: bool) -> Result<()> {
    assert!(ok, "CUDA: buffer too small for {what}");
    Ok(())
}

pub struct Kernels {
    _module: Arc<CudaModule>,
    bn_fold: CudaFunction,
    scale_shift_act: CudaFunction,
    max_pool: CudaFunction,
    avg_pool: CudaFunction,
    add_bias: CudaFunction,
    to_bf16_nhwc: CudaFunction,
    scale_shift_act_bf16: CudaFunction,
    max_pool_bf16: CudaFunction,
    avg_pool_bf16: CudaFunction,
}

impl Kernels {
    pub fn load(dev: &Device) -> Result<Kernels> {
        let ptx = cudarc::nvrtc::compile_ptx([SOURCE_F32, BF16, SOURCE_BF16].concat())
            .map_err(cuda_err("compiling the kernels with NVRTC"))?;
        let module = dev.ctx.load_module(ptx).map_err(cuda_err("loading the kernels"))?;
        let f = |name: &str| module.load_function(name).map_err(cuda_err("finding a kernel"));
        Ok(Kernels {
            bn_fold: f("bn_fold")?,
            scale_shift_act: f("scale_shift_act")?,
            max_pool: f("max_pool_3x3s2")?,
            avg_pool: f("global_avg_pool")?,
            add_bias: f("add_bias")?,
            to_bf16_nhwc: f("to_bf16_nhwc")?,
            scale_shift_act_bf16: f("scale_shift_act_bf16")?,
            max_pool_bf16: f("max_pool_3x3s2_bf16")?,
            avg_pool_bf16: f("global_avg_pool_bf16")?,
            _module: module,
        })
    }

    /// scale/shift of `channels` channels from gamma, beta, running mean and variance.
    #[allow(clippy::too_many_arguments)]
    pub fn bn_fold(
        &self,
        dev: &Device,
        [gamma, beta, mean, var]: [&Buf<f32>; 4],
        eps: f32,
        scale: &Buf<f32>,
        shift: &Buf<f32>,
        channels: usize,
    ) -> Result<()> {
        check("bn_fold", [gamma, beta, mean, var, scale, shift].iter().all(|b| b.len >= channels))?;
        let c = i32_of(channels)?;
        let mut b = dev.stream.launch_builder(&self.bn_fold);
        b.arg(&gamma.ptr).arg(&beta.ptr).arg(&mean.ptr).arg(&var.ptr).arg(&eps).arg(&scale.ptr).arg(&shift.ptr).arg(&c);
        // SAFETY: the argument list matches bn_fold's signature (six float* as u64, float, int); every thread
        // touches index < channels, and all six buffers hold at least `channels` floats (checked above).
        unsafe { b.launch(grid(channels)) }.map(drop).map_err(cuda_err("bn_fold"))
    }

    /// y = act(x·scale + shift + res) over an NCHW tensor of `dims`; `y` may be `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn scale_shift_act(
        &self,
        dev: &Device,
        y: &Buf<f32>,
        x: &Buf<f32>,
        res: Option<&Buf<f32>>,
        scale: &Buf<f32>,
        shift: &Buf<f32>,
        dims: [usize; 4],
        relu: bool,
    ) -> Result<()> {
        let [_, c, h, w] = dims;
        let total: usize = dims.iter().product();
        let fits = y.len >= total && x.len >= total && res.is_none_or(|r| r.len >= total);
        check("scale_shift_act", fits && scale.len >= c && shift.len >= c && c > 0 && h * w > 0)?;
        let (total_i, plane, channels, relu) = (total as i64, (h * w) as i64, i32_of(c)?, i32::from(relu));
        let res_ptr: u64 = res.map_or(0, |r| r.ptr);
        let mut b = dev.stream.launch_builder(&self.scale_shift_act);
        b.arg(&y.ptr).arg(&x.ptr).arg(&res_ptr).arg(&scale.ptr).arg(&shift.ptr);
        b.arg(&total_i).arg(&plane).arg(&channels).arg(&relu);
        // SAFETY: arguments match scale_shift_act's signature (five float* as u64, two long long, two int); indices
        // stay below `total`, which y, x and res (when not null) hold, and channel indices below `c`, which scale
        // and shift hold (checked above). y == x is allowed: each thread reads then writes its own element.
        unsafe { b.launch(grid(total)) }.map(drop).map_err(cuda_err("scale_shift_act"))
    }

    /// 3x3/2 max-pool with padding 1 of `x` (`dims`) into `y`, which gets `out_hw`.
    pub fn max_pool(
        &self,
        dev: &Device,
        x: &Buf<f32>,
        y: &Buf<f32>,
        dims: [usize; 4],
        out_hw: (usize, usize),
    ) -> Result<()> {
        let [n, c, h, w] = dims;
        let (oh, ow) = out_hw;
        check("max_pool", x.len >= n * c * h * w && y.len >= n * c * oh * ow && oh > 0 && ow > 0)?;
        let planes = (n * c) as i64;
        let (h, w, oh, ow) = (i32_of(h)?, i32_of(w)?, i32_of(oh)?, i32_of(ow)?);
        let mut b = dev.stream.launch_builder(&self.max_pool);
        b.arg(&x.ptr).arg(&y.ptr).arg(&planes).arg(&h).arg(&w).arg(&oh).arg(&ow);
        // SAFETY: arguments match max_pool_3x3s2 (two float* as u64, long long, four int); outputs are indexed
        // below planes·oh·ow and inputs below planes·h·w (window clipped to the plane), both checked above.
        unsafe { b.launch(grid(n * c * out_hw.0 * out_hw.1)) }.map(drop).map_err(cuda_err("max_pool"))
    }

    /// Plane means of `x` (`dims`) into `y` as `[N, C]`.
    pub fn avg_pool(&self, dev: &Device, x: &Buf<f32>, y: &Buf<f32>, dims: [usize; 4]) -> Result<()> {
        let [n, c, h, w] = dims;
        check("avg_pool", x.len >= n * c * h * w && y.len >= n * c && h * w > 0)?;
        let (planes, plane) = (i32_of(n * c)?, i32_of(h * w)?);
        let warps_per_block = (THREADS / 32) as usize;
        let blocks = u32::try_from((n * c).div_ceil(warps_per_block).max(1))
            .map_err(|_| Error::invalid("CUDA: too many planes for avg_pool"))?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut b = dev.stream.launch_builder(&self.avg_pool);
        b.arg(&x.ptr).arg(&y.ptr).arg(&planes).arg(&plane);
        // SAFETY: arguments match global_avg_pool (two float* as u64, two int); a warp handles plane < planes,
        // reading planes·plane floats of x and writing planes floats of y, both checked above. THREADS is a
        // multiple of 32, so no warp straddles a block.
        unsafe { b.launch(cfg) }.map(drop).map_err(cuda_err("avg_pool"))
    }

    /// y[r, :] += bias for a row-major `[rows, cols]` y.
    pub fn add_bias(&self, dev: &Device, y: &Buf<f32>, bias: &Buf<f32>, rows: usize, cols: usize) -> Result<()> {
        check("add_bias", y.len >= rows * cols && bias.len >= cols && cols > 0)?;
        let (r, c) = (i32_of(rows)?, i32_of(cols)?);
        let mut b = dev.stream.launch_builder(&self.add_bias);
        b.arg(&y.ptr).arg(&bias.ptr).arg(&r).arg(&c);
        // SAFETY: arguments match add_bias (two float* as u64, two int); indices stay below rows·cols in y and
        // below cols in bias, both checked above.
        unsafe { b.launch(grid(rows * cols)) }.map(drop).map_err(cuda_err("add_bias"))
    }

    /// fp32 `[n, c, hw]` → bf16 bits `[n, hw, c]` (NCHW images to NHWC; OIHW weights to OHWI).
    pub fn to_bf16_nhwc(&self, dev: &Device, x: &Buf<f32>, y: &Buf<u16>, n: usize, c: usize, hw: usize) -> Result<()> {
        let total = n * c * hw;
        check("to_bf16_nhwc", x.len >= total && y.len >= total && c > 0 && hw > 0)?;
        let (n_i, c_i, hw_i) = (n as i64, i32_of(c)?, i32_of(hw)?);
        let mut b = dev.stream.launch_builder(&self.to_bf16_nhwc);
        b.arg(&x.ptr).arg(&y.ptr).arg(&n_i).arg(&c_i).arg(&hw_i);
        // SAFETY: arguments match to_bf16_nhwc (float*, bf16* as u64, long long, two int); every index is below
        // n·c·hw in both buffers (checked above).
        unsafe { b.launch(grid(total)) }.map(drop).map_err(cuda_err("to_bf16_nhwc"))
    }

    /// y = act(x·scale + shift + res) over a bf16 NHWC tensor of logical `dims` `[N, C, H, W]`; `y` may be `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn scale_shift_act_bf16(
        &self,
        dev: &Device,
        y: &Buf<u16>,
        x: &Buf<u16>,
        res: Option<&Buf<u16>>,
        scale: &Buf<f32>,
        shift: &Buf<f32>,
        dims: [usize; 4],
        relu: bool,
    ) -> Result<()> {
        let c = dims[1];
        let total: usize = dims.iter().product();
        let fits = y.len >= total && x.len >= total && res.is_none_or(|r| r.len >= total);
        check("scale_shift_act_bf16", fits && scale.len >= c && shift.len >= c && c > 0)?;
        // 16-byte accesses need every buffer 16-byte aligned (cudaMalloc gives 256) and whole channel groups.
        let aligned = [Some(y), Some(x), res].iter().flatten().all(|b| b.ptr % 16 == 0);
        let vec8 = c.is_multiple_of(8) && aligned;
        let (total_i, channels, relu, vec8_i) = (total as i64, i32_of(c)?, i32::from(relu), i32::from(vec8));
        let res_ptr: u64 = res.map_or(0, |r| r.ptr);
        let mut b = dev.stream.launch_builder(&self.scale_shift_act_bf16);
        b.arg(&y.ptr).arg(&x.ptr).arg(&res_ptr).arg(&scale.ptr).arg(&shift.ptr);
        b.arg(&total_i).arg(&channels).arg(&relu).arg(&vec8_i);
        // SAFETY: arguments match scale_shift_act_bf16 (three bf16* and two float* as u64, long long, three int);
        // element indices stay below `total` (the vector path covers total/8 groups of 8, exact since C % 8 == 0
        // makes total a multiple of 8), which y, x and res hold, channel indices below `c`, which scale and shift
        // hold (checked above); 16-byte accesses only on 16-byte aligned buffers. y == x is allowed: each thread
        // reads then writes its own elements.
        unsafe { b.launch(grid(if vec8 { total / 8 } else { total })) }
            .map(drop)
            .map_err(cuda_err("scale_shift_act_bf16"))
    }

    /// 3x3/2 max-pool with padding 1 of bf16 NHWC `x` (logical `dims`) into `y`, which gets `out_hw`.
    pub fn max_pool_bf16(
        &self,
        dev: &Device,
        x: &Buf<u16>,
        y: &Buf<u16>,
        dims: [usize; 4],
        out_hw: (usize, usize),
    ) -> Result<()> {
        let [n, c, h, w] = dims;
        let (oh, ow) = out_hw;
        check("max_pool_bf16", x.len >= n * c * h * w && y.len >= n * c * oh * ow && oh > 0 && ow > 0 && c > 0)?;
        let (n_i, c_i, h, w, oh, ow) = (n as i64, i32_of(c)?, i32_of(h)?, i32_of(w)?, i32_of(oh)?, i32_of(ow)?);
        let mut b = dev.stream.launch_builder(&self.max_pool_bf16);
        b.arg(&x.ptr).arg(&y.ptr).arg(&n_i).arg(&c_i).arg(&h).arg(&w).arg(&oh).arg(&ow);
        // SAFETY: arguments match max_pool_3x3s2_bf16 (two bf16* as u64, long long, five int); outputs are indexed
        // below n·oh·ow·c and inputs below n·h·w·c (window clipped to the image), both checked above.
        unsafe { b.launch(grid(n * c * out_hw.0 * out_hw.1)) }.map(drop).map_err(cuda_err("max_pool_bf16"))
    }

    /// Channel means of bf16 NHWC `x` (logical `dims`) into fp32 `y` as `[N, C]`.
    pub fn avg_pool_bf16(&self, dev: &Device, x: &Buf<u16>, y: &Buf<f32>, dims: [usize; 4]) -> Result<()> {
        let [n, c, h, w] = dims;
        check("avg_pool_bf16", x.len >= n * c * h * w && y.len >= n * c && h * w > 0 && c > 0)?;
        let (n_i, c_i, hw) = (n as i64, i32_of(c)?, i32_of(h * w)?);
        let mut b = dev.stream.launch_builder(&self.avg_pool_bf16);
        b.arg(&x.ptr).arg(&y.ptr).arg(&n_i).arg(&c_i).arg(&hw);
        // SAFETY: arguments match global_avg_pool_bf16 (bf16*, float* as u64, long long, two int); thread i < n·c
        // reads x[(i / c)·hw·c + k·c + i % c] < n·hw·c and writes y[i], both checked above.
        unsafe { b.launch(grid(n * c)) }.map(drop).map_err(cuda_err("avg_pool_bf16"))
    }
}
