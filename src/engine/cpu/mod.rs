//! The CPU backend: Winograd or im2col + `gemm` for convolutions and the linear head, rayon for everything else.

pub mod algo;
mod batch_sum;
mod bf16;
mod conv;
mod crop;
mod elementwise;
pub mod int8;
pub mod isa;
pub mod kept;
mod lanes;
mod linear;
mod loss;
pub mod matmul;
mod norm;
pub mod packed;
mod pool;
mod scratch;
#[cfg(test)]
mod test_util;
pub mod winograd;
mod winograd2;

pub use algo::{ConvAlgo, keeps_u, resolve as conv_algo};
pub use conv::{backward_with as conv2d_backward_with, forward_int8 as conv2d_int8, forward_with as conv2d_with};
pub use norm::Affine;

use super::Tensor;
use super::backend::{Backend, BatchNormSums, BatchStats, ConvGeom};

/// max(v, 0) as PyTorch computes it: a NaN stays NaN (`f32::max` would turn it into 0 and hide a blow-up
/// from the numeric guard), and the select vectorises like `max` does.
#[inline(always)]
pub(crate) fn relu1(v: f32) -> f32 {
    if v < 0.0 { 0.0 } else { v }
}

/// What the convolutions' products multiply: f32 operands, or (training with `--dtype bf16`) operands rounded to
/// bf16 with f32 accumulation, as PyTorch's CPU autocast; everything else stays f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Operands {
    #[default]
    F32,
    Bf16,
}

/// The CPU backend. Threads come from rayon's global pool (`RAYON_NUM_THREADS` sets their number).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    operands: Operands,
}

impl Cpu {
    /// Everything in f32.
    pub const F32: Cpu = Cpu { operands: Operands::F32 };

    /// bf16 mixed precision as PyTorch's CPU autocast: convolutions and the linear head multiply operands rounded
    /// to bf16 and accumulate in f32; activations, batch norm and the loss stay f32. None without AVX512-BF16.
    pub fn bf16() -> Option<Cpu> {
        packed::bf16_supported().then_some(Cpu { operands: Operands::Bf16 })
    }

    pub fn operands(&self) -> Operands {
        self.operands
    }
}

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn conv2d(&self, x: &Tensor, w: &Tensor, geom: ConvGeom) -> Tensor {
        conv::forward(x, w, geom, self.operands)
    }
    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        geom: ConvGeom,
        need_dx: bool,
        need_dw: bool,
    ) -> (Option<Tensor>, Option<Tensor>) {
        conv::backward(x, w, dy, geom, (need_dx, need_dw), self.operands)
    }
    fn batch_norm_stats(&self, x: &Tensor) -> BatchStats {
        norm::stats(x)
    }
    fn batch_norm_normalize(
        &self,
        x: &Tensor,
        mean: &[f32],
        invstd: &[f32],
        gamma: &[f32],
        beta: &[f32],
    ) -> (Tensor, Tensor) {
        norm::normalize(x, mean, invstd, gamma, beta)
    }
    fn affine_act(&self, x: Tensor, scale: &[f32], shift: &[f32], residual: Option<&Tensor>, relu: bool) -> Tensor {
        norm::affine_act(x, scale, shift, residual, relu)
    }
    fn batch_norm_grad_sums(&self, dy: &Tensor, x_hat: &Tensor) -> BatchNormSums {
        norm::grad_sums(dy, x_hat)
    }
    fn batch_norm_grad_input(
        &self,
        dy: &Tensor,
        x_hat: &Tensor,
        invstd: &[f32],
        gamma: &[f32],
        sums: &BatchNormSums,
        count: f64,
    ) -> Tensor {
        norm::grad_input(dy, x_hat, invstd, gamma, sums, count)
    }
    fn relu(&self, x: Tensor) -> Tensor {
        elementwise::relu(x)
    }
    fn relu_backward(&self, dy: Tensor, y: &Tensor) -> Tensor {
        elementwise::relu_backward(dy, y)
    }
    fn add_relu(&self, a: Tensor, b: &Tensor) -> Tensor {
        elementwise::add(a, b, true)
    }
    fn add(&self, a: Tensor, b: &Tensor) -> Tensor {
        elementwise::add(a, b, false)
    }
    fn max_pool2d(&self, x: &Tensor, kernel: usize, stride: usize, padding: usize) -> (Tensor, Vec<u32>) {
        pool::max_forward(x, kernel, stride, padding)
    }
    fn max_pool2d_values(&self, x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Tensor {
        pool::max_values(x, kernel, stride, padding)
    }
    fn max_pool2d_backward(&self, dy: &Tensor, argmax: &[u32], x_shape: [usize; 4]) -> Tensor {
        pool::max_backward(dy, argmax, x_shape)
    }
    fn global_avg_pool(&self, x: &Tensor) -> Tensor {
        pool::avg_forward(x)
    }
    fn global_avg_pool_backward(&self, dy: &Tensor, x_shape: [usize; 4]) -> Tensor {
        pool::avg_backward(dy, x_shape)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, b: &[f32]) -> Tensor {
        linear::forward(x, w, b, self.operands)
    }
    fn linear_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need_dx: bool,
        need_dw: bool,
    ) -> (Option<Tensor>, Option<(Tensor, Vec<f32>)>) {
        linear::backward(x, w, dy, need_dx, need_dw, self.operands)
    }
    fn softmax_cross_entropy(&self, logits: &Tensor, targets: &Tensor) -> (f32, Tensor) {
        loss::softmax_cross_entropy(logits, targets)
    }
}
