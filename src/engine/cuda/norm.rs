//! Eval-mode batch norm as a per-channel affine map folded from the stored statistics, applied by the fused
//! scale/shift (+ residual) (+ ReLU) kernel right after each convolution, so BN, the residual join and the ReLU
//! cost one pass over the activation.

use super::device::{Buf, Device};
use super::kernels::Kernels;
use crate::error::Result;

/// One BN layer: indices of its weight, bias, running mean and running variance in the executor's tensor table,
/// and the folded scale and shift.
pub struct Norm {
    pub tensors: [usize; 4],
    pub channels: usize,
    /// The ε of 1/√(var + ε), the model's (PyTorch's 1e-5).
    eps: f32,
    scale: Buf<f32>,
    shift: Buf<f32>,
}

impl Norm {
    pub fn new(dev: &Device, tensors: [usize; 4], channels: usize, eps: f32) -> Result<Norm> {
        Ok(Norm { tensors, channels, eps, scale: dev.zeros(channels)?, shift: dev.zeros(channels)? })
    }

    /// Recompute scale and shift from the current weight, bias and running statistics.
    pub fn fold(&self, dev: &Device, kernels: &Kernels, table: &[Buf<f32>]) -> Result<()> {
        let [g, b, m, v] = self.tensors.map(|i| &table[i]);
        kernels.bn_fold(dev, [g, b, m, v], self.eps, &self.scale, &self.shift, self.channels)
    }

    /// y = act(x·scale + shift + res) over `dims`, in place when `y` is `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        dev: &Device,
        kernels: &Kernels,
        y: &Buf<f32>,
        x: &Buf<f32>,
        res: Option<&Buf<f32>>,
        dims: [usize; 4],
        relu: bool,
    ) -> Result<()> {
        kernels.scale_shift_act(dev, y, x, res, &self.scale, &self.shift, dims, relu)
    }

    /// As `apply`, on bf16 NHWC tensors of logical `dims`.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_bf16(
        &self,
        dev: &Device,
        kernels: &Kernels,
        y: &Buf<u16>,
        x: &Buf<u16>,
        res: Option<&Buf<u16>>,
        dims: [usize; 4],
        relu: bool,
    ) -> Result<()> {
        kernels.scale_shift_act_bf16(dev, y, x, res, &self.scale, &self.shift, dims, relu)
    }
}
