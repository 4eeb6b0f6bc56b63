//! The backend seam: every operation ResNet needs, forward and backward, behind one trait.
//!
//! Layers (in `model/`) own their parameters and decide what to keep for backward; a backend only computes.
//! The CPU backend implements this today; a CUDA backend (cuDNN/cuBLAS) implements the same trait later, with
//! its tensors living in device memory. Shapes are NCHW; weights follow PyTorch's layouts
//! (conv `[out, in, kh, kw]`, linear `[out, in]`) so torchvision checkpoints load without transposes.

use super::Tensor;

/// Stride and zero padding of a 2-d convolution, per spatial dimension (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl ConvGeom {
    pub fn square(stride: usize, padding: usize) -> Self {
        ConvGeom { stride: (stride, stride), padding: (padding, padding) }
    }

    /// Output height and width for an input of `h`×`w` and a `kh`×`kw` kernel (PyTorch's floor rule).
    pub fn output_hw(&self, h: usize, w: usize, kh: usize, kw: usize) -> (usize, usize) {
        let oh = (h + 2 * self.padding.0).saturating_sub(kh) / self.stride.0 + 1;
        let ow = (w + 2 * self.padding.1).saturating_sub(kw) / self.stride.1 + 1;
        (oh, ow)
    }
}

/// What inference applies to a convolution's output, per channel c: relu?(y·scale[c] + shift[c] + residual?).
#[derive(Clone, Copy)]
pub struct EvalAffine<'a> {
    pub scale: &'a [f32],
    pub shift: &'a [f32],
    /// Same shape as the convolution's output.
    pub residual: Option<&'a Tensor>,
    pub relu: bool,
}

/// Eval-mode batch norm as the per-channel affine map it is: scale = γ/√(var+ε), shift = β − mean·scale.
pub fn batch_norm_affine(gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gamma.iter().zip(var).map(|(&g, &v)| g / (v + eps).sqrt()).collect();
    let shift = beta.iter().zip(mean).zip(&scale).map(|((&b, &m), &s)| b - m * s).collect();
    (scale, shift)
}

/// One replica's batch statistics per channel, over N, H and W, in f64: what training-mode batch norm
/// normalises with, and (summed over the ranks by `to_sums`/`from_sums`) what SyncBatchNorm normalises with.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchStats {
    /// Values per channel (N·H·W).
    pub count: f64,
    pub mean: Vec<f64>,
    /// Σ(x − mean)² per channel.
    pub m2: Vec<f64>,
}

impl BatchStats {
    /// Biased variance (divided by the count): the one batch norm normalises with.
    pub fn var(&self) -> Vec<f64> {
        let n = self.count.max(1.0);
        self.m2.iter().map(|m| m / n).collect()
    }

    /// The statistics as sums that add over replicas: [count, Σx per channel, Σx² per channel]. (Σx² =
    /// M2 + n·mean²: the cancellation in `from_sums` costs ~1e-16·mean²/var of the variance in f64.)
    pub fn to_sums(&self) -> Vec<f64> {
        let c = self.mean.len();
        let mut out = Vec::with_capacity(1 + 2 * c);
        out.push(self.count);
        out.extend(self.mean.iter().map(|m| m * self.count));
        out.extend(self.m2.iter().zip(&self.mean).map(|(m2, m)| m2 + self.count * m * m));
        out
    }

    /// The statistics of the union of the replicas' batches, from their `to_sums` added element-wise.
    pub fn from_sums(sums: &[f64]) -> BatchStats {
        let c = sums.len().saturating_sub(1) / 2;
        let count = sums.first().copied().unwrap_or(0.0);
        let n = count.max(1.0);
        let mean: Vec<f64> = sums[1..1 + c].iter().map(|s| s / n).collect();
        let m2 = sums[1 + c..].iter().zip(&mean).map(|(s2, m)| (s2 - n * m * m).max(0.0)).collect();
        BatchStats { count, mean, m2 }
    }
}

/// The per-channel reductions of batch norm's backward: Σdy (= dβ) and Σdy·x̂ (= dγ), in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormSums {
    pub dy: Vec<f64>,
    pub dy_xhat: Vec<f64>,
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// y = conv2d(x, w) without bias; x `[N, C, H, W]`, w `[O, C, kh, kw]`.
    fn conv2d(&self, x: &Tensor, w: &Tensor, geom: ConvGeom) -> Tensor;
    /// Gradients of Σ(y·dy) with respect to x (if `need_dx`) and w (if `need_dw`).
    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        geom: ConvGeom,
        need_dx: bool,
        need_dw: bool,
    ) -> (Option<Tensor>, Option<Tensor>);

    /// Training-mode batch norm in two halves, so that the statistics can be summed over replicas in between
    /// (SyncBatchNorm): the batch's statistics, then y = x̂·γ + β with x̂ = (x − mean)·invstd. Returns (y, x̂).
    fn batch_norm_stats(&self, x: &Tensor) -> BatchStats;
    fn batch_norm_normalize(
        &self,
        x: &Tensor,
        mean: &[f32],
        invstd: &[f32],
        gamma: &[f32],
        beta: &[f32],
    ) -> (Tensor, Tensor);
    /// relu?(x·scale + shift + residual?) with one scale and shift per channel, in place on x, in one pass:
    /// eval-mode batch norm (see `batch_norm_affine`) with the ReLU and the residual join that follow it.
    fn affine_act(&self, x: Tensor, scale: &[f32], shift: &[f32], residual: Option<&Tensor>, relu: bool) -> Tensor;
    /// `affine_act(conv2d(x, w), ..)`: inference's convolution + batch norm (+ residual) (+ ReLU) in one call, so
    /// that a backend can apply the affine map as it writes the convolution's output instead of in another pass.
    fn conv2d_affine_act(&self, x: &Tensor, w: &Tensor, geom: ConvGeom, affine: EvalAffine) -> Tensor {
        let y = self.conv2d(x, w, geom);
        self.affine_act(y, affine.scale, affine.shift, affine.residual, affine.relu)
    }
    /// Batch norm's backward in the same two halves: the per-channel sums, then, with the sums and the count of
    /// the whole (possibly multi-replica) batch, dx = γ·invstd/M · (M·dy − Σdy − x̂·Σ(dy·x̂)).
    fn batch_norm_grad_sums(&self, dy: &Tensor, x_hat: &Tensor) -> BatchNormSums;
    fn batch_norm_grad_input(
        &self,
        dy: &Tensor,
        x_hat: &Tensor,
        invstd: &[f32],
        gamma: &[f32],
        sums: &BatchNormSums,
        count: f64,
    ) -> Tensor;

    /// max(x, 0), in place.
    fn relu(&self, x: Tensor) -> Tensor;
    /// dy masked by y > 0, where y is the ReLU's output.
    fn relu_backward(&self, dy: Tensor, y: &Tensor) -> Tensor;
    /// relu(a + b), in place on `a`: the residual join.
    fn add_relu(&self, a: Tensor, b: &Tensor) -> Tensor;
    /// a + b, in place on `a`: where two gradient paths meet.
    fn add(&self, a: Tensor, b: &Tensor) -> Tensor;

    /// Max pooling with −∞ padding; also returns, per output, the flat index of the winner within its plane.
    fn max_pool2d(&self, x: &Tensor, kernel: usize, stride: usize, padding: usize) -> (Tensor, Vec<u32>);
    /// `max_pool2d`'s values alone, for inference (no backward needs the winners).
    fn max_pool2d_values(&self, x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Tensor {
        self.max_pool2d(x, kernel, stride, padding).0
    }
    fn max_pool2d_backward(&self, dy: &Tensor, argmax: &[u32], x_shape: [usize; 4]) -> Tensor;

    /// Mean over H and W: `[N, C, H, W]` → `[N, C]`.
    fn global_avg_pool(&self, x: &Tensor) -> Tensor;
    fn global_avg_pool_backward(&self, dy: &Tensor, x_shape: [usize; 4]) -> Tensor;

    /// y = x·wᵀ + b; x `[N, in]`, w `[out, in]`.
    fn linear(&self, x: &Tensor, w: &Tensor, b: &[f32]) -> Tensor;
    /// (dx if `need_dx`, (dw, db) if `need_dw`).
    fn linear_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need_dx: bool,
        need_dw: bool,
    ) -> (Option<Tensor>, Option<(Tensor, Vec<f32>)>);

    /// Mean softmax cross-entropy over the batch against target distributions `[N, C]` (one-hot, label-smoothed
    /// or mixed; see `targets`), as PyTorch's `CrossEntropyLoss` with probability targets, and its gradient with
    /// respect to the logits.
    fn softmax_cross_entropy(&self, logits: &Tensor, targets: &Tensor) -> (f32, Tensor);
}
