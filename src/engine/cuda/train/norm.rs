//! Training-mode batch norm through cuDNN (`cudnnBatchNormalizationForwardTraining` / `Backward`, spatial mode):
//! batch statistics, the running statistics updated in place with momentum 0.1 and the unbiased variance, and the
//! saved mean and 1/σ that backward reuses. This is the computation PyTorch runs on the GPU. With bf16 storage the
//! same layer runs on the trainer's own kernels instead (`half.rs`: fp32 statistics over bf16 NHWC activations).

use std::ffi::c_void;

use cudarc::cudnn::sys;

use super::super::conv::{Storage, TensorDesc, tensor_desc};
use super::super::device::{Buf, Device, cuda_err};
use super::half::{BnBufs, BnConsts, HalfKernels};
use crate::engine::widen;
use crate::error::{Error, Result};

const MODE: sys::cudnnBatchNormMode_t = sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;

/// One BN layer: its four tensors in the trainer's table (weight, bias, running mean, running variance), the
/// `[1, C, 1, 1]` descriptor of those, and the batch mean and 1/σ saved by the last forward.
pub struct TrainNorm {
    pub tensors: [usize; 4],
    pub channels: usize,
    /// ε and the running-average factor, the model's (PyTorch's 1e-5 and 0.1); cuDNN takes them as doubles,
    /// widened as Python would hold them.
    consts: BnConsts,
    desc: TensorDesc,
    save_mean: Buf<f32>,
    save_invstd: Buf<f32>,
}

impl TrainNorm {
    pub fn new(dev: &Device, tensors: [usize; 4], channels: usize, consts: BnConsts) -> Result<TrainNorm> {
        Ok(TrainNorm {
            tensors,
            channels,
            consts,
            desc: tensor_desc([1, channels, 1, 1], Storage::F32Nchw)?,
            save_mean: dev.zeros(channels)?,
            save_invstd: dev.zeros(channels)?,
        })
    }

    fn check(&self, table: &[Buf<f32>], bufs: &[&Buf<f32>], len: usize) -> Result<()> {
        let c = self.channels;
        let ok =
            self.tensors.iter().all(|&i| table.get(i).is_some_and(|b| b.len >= c)) && bufs.iter().all(|b| b.len >= len);
        assert!(ok, "CUDA: buffers too small for batch norm (a bug in the caller)");
        Ok(())
    }

    /// y = γ·(x − μ_B)/σ_B + β over `x` described by `x_desc` (`len` floats), updating the running statistics.
    pub fn forward(
        &self,
        dev: &Device,
        x_desc: sys::cudnnTensorDescriptor_t,
        x: &Buf<f32>,
        y: &Buf<f32>,
        len: usize,
        table: &[Buf<f32>],
    ) -> Result<()> {
        self.check(table, &[x, y], len)?;
        let [g, b, rm, rv] = self.tensors.map(|i| table[i].ptr);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: x_desc describes the fp32 NCHW x and y (`len` floats each, checked) and `desc` the [1, C, 1, 1]
        // γ, β, running mean/variance and saved mean/1/σ (C floats each, checked and allocated); x and y are
        // distinct buffers; the argument order is cudnnBatchNormalizationForwardTraining's (handle, mode, alpha,
        // beta, xDesc, x, yDesc, y, bnDesc, scale, bias, factor, runningMean, runningVar, eps, saveMean,
        // saveInvVar); alpha/beta are host f32s; everything runs on the handle's stream.
        unsafe {
            sys::cudnnBatchNormalizationForwardTraining(
                dev.dnn.raw(),
                MODE,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                x_desc,
                x.ptr as *const c_void,
                x_desc,
                y.ptr as *mut c_void,
                self.desc.0,
                g as *const c_void,
                b as *const c_void,
                widen(self.consts.momentum),
                rm as *mut c_void,
                rv as *mut c_void,
                widen(self.consts.eps),
                self.save_mean.ptr as *mut c_void,
                self.save_invstd.ptr as *mut c_void,
            )
        }
        .result()
        .map_err(cuda_err("batch norm forward"))
    }

    /// dx from dy (overwriting dx) and dγ, dβ into `grads` (overwriting), with the statistics of the last forward.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dev: &Device,
        x_desc: sys::cudnnTensorDescriptor_t,
        x: &Buf<f32>,
        dy: &Buf<f32>,
        dx: &Buf<f32>,
        len: usize,
        table: &[Buf<f32>],
        [dgamma, dbeta]: [&Buf<f32>; 2],
    ) -> Result<()> {
        self.check(table, &[x, dy, dx], len)?;
        if dgamma.len < self.channels || dbeta.len < self.channels {
            return Err(Error::invalid("CUDA: gradient buffers too small for batch norm"));
        }
        let (one, zero) = (1.0f32, 0.0f32);
        let (one, zero) = (&one as *const f32 as *const c_void, &zero as *const f32 as *const c_void);
        // SAFETY: as in forward, for x, dy and dx (`len` floats, distinct buffers) and the C-float parameter
        // tensors; the order is cudnnBatchNormalizationBackward's (handle, mode, alphaDataDiff, betaDataDiff,
        // alphaParamDiff, betaParamDiff, xDesc, x, dyDesc, dy, dxDesc, dx, bnDesc, scale, dScale, dBias, eps,
        // savedMean, savedInvVar); beta 0 overwrites dx, dγ and dβ; the saved statistics are this layer's own,
        // written by its forward earlier on the same stream.
        unsafe {
            sys::cudnnBatchNormalizationBackward(
                dev.dnn.raw(),
                MODE,
                one,
                zero,
                one,
                zero,
                x_desc,
                x.ptr as *const c_void,
                x_desc,
                dy.ptr as *const c_void,
                x_desc,
                dx.ptr as *mut c_void,
                self.desc.0,
                table[self.tensors[0]].ptr as *const c_void,
                dgamma.ptr as *mut c_void,
                dbeta.ptr as *mut c_void,
                widen(self.consts.eps),
                self.save_mean.ptr as *const c_void,
                self.save_invstd.ptr as *const c_void,
            )
        }
        .result()
        .map_err(cuda_err("batch norm backward"))
    }
}

/// The shared scratch of the bf16 BN passes: the per-slice partial sums and, in forward, the folded scale and
/// shift the fused normalise + residual + ReLU kernel reads right after.
pub(crate) struct BnScratch<'a> {
    pub kernels: &'a HalfKernels,
    pub partials: &'a Buf<f64>,
    pub scale_shift: [&'a Buf<f32>; 2],
}

impl TrainNorm {
    /// bf16 NHWC train-mode BN statistics of x (`rows` = N·H·W): the saved mean and 1/σ, the running statistics
    /// moved, and the folded scale and shift in `scratch.scale_shift`.
    pub(crate) fn forward_bf16(
        &self,
        dev: &Device,
        x: &Buf<u16>,
        rows: usize,
        table: &[Buf<f32>],
        scratch: &BnScratch,
    ) -> Result<()> {
        let [g, b, rm, rv] = self.tensors.map(|i| &table[i]);
        let bufs = BnBufs {
            gamma: g,
            beta: b,
            running: [rm, rv],
            saved: [&self.save_mean, &self.save_invstd],
            out: scratch.scale_shift,
        };
        scratch.kernels.bn_forward(dev, x, &bufs, scratch.partials, (rows, self.channels), self.consts)
    }

    /// bf16 NHWC BN backward: dx from dy (overwriting dx), dγ and dβ into `grads` (overwriting), with the
    /// statistics of the last forward.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_bf16(
        &self,
        dev: &Device,
        (x, dy, dx): (&Buf<u16>, &Buf<u16>, &Buf<u16>),
        rows: usize,
        table: &[Buf<f32>],
        [dgamma, dbeta]: [&Buf<f32>; 2],
        scratch: &BnScratch,
    ) -> Result<()> {
        let [g, b, rm, rv] = self.tensors.map(|i| &table[i]);
        let bufs = BnBufs {
            gamma: g,
            beta: b,
            running: [rm, rv],
            saved: [&self.save_mean, &self.save_invstd],
            out: [dgamma, dbeta],
        };
        scratch.kernels.bn_backward(dev, x, dy, dx, &bufs, scratch.partials, (rows, self.channels))
    }
}
