//! `PreparedCpu`: the CPU backend for repeated inference with fixed weights. It keeps each 3x3 convolution's
//! Winograd-transformed weight U from its first call, so later calls skip the transform and only stream U, and
//! every convolution's weight packed for `packed::PackedLhs` (on CPUs with AVX-512), so no call packs it again.
//! In bf16 (`PreparedCpu::bf16`) the packed weights and each call's transformed input or im2col columns are
//! rounded to bf16 and multiplied with f32 accumulation; everything between convolutions stays f32.
//!
//! Rebuilding U costs the same whatever the batch, so at batch 1 it is most of a Winograd convolution and
//! `ConvAlgo::Auto` must keep the 14x14 and 28x28 layers on im2col; with U kept, Winograd's 4x fewer multiplies
//! win there too (and at batch 8 the 14x14 layers gain a third). U is 4x the kernel (36 transformed taps for 9),
//! so only convolutions whose U stays under `MAX_KEPT_BYTES` are kept: in f32 on ResNet-34 every 3x3 layer up
//! to 256 channels (124 MB in all) but not the 512-channel ones (37.7 MB each, 189 MB for five), which would
//! gain about 7 ms each at batch 8 but take peak memory past half of PyTorch's; they stay on im2col. In bf16
//! U takes half the bytes and those are kept too (18.9 MB each).
//!
//! Weights are recognised by `Tensor::version`, which changes whenever values change and is never reused, so
//! changed or other weights are never confused with kept ones. Kept entries are never dropped, though: the
//! backend is for weights that stay fixed (`infer::runner::Runner` keeps one beside the model it serves);
//! used on a model being trained it would keep a U per step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::matmul::MatRef;
use super::norm::Affine;
use super::packed::{self, PackedLhs};
use super::{Cpu, conv, winograd, winograd2};
use crate::engine::Tensor;
use crate::engine::backend::{Backend, BatchNormGrads, BatchNormTrain, ConvGeom, EvalAffine};

/// Largest U kept per convolution (in the precision it is kept in).
const MAX_KEPT_BYTES: usize = 20 << 20;

/// Fewest 4x4 output tiles for which a kept-U Winograd convolution beats im2col, measured on 2 threads with
/// `cargo bench --bench conv_algos` ("kept U" column, same runs): one 14x14 image (16 tiles, 256 channels)
/// 0.85-0.96 ms against im2col's 2.0-3.2; one 28x28 image (49 tiles, 128 channels) 1.0-1.4 against 1.7-2.7.
/// One 7x7 image (4 tiles, 512 channels) 3.4-4.2 against 2.3-3.1, so fewer tiles stay on im2col.
const MIN_TILES: usize = 16;

/// Fewest channels on either side, as for `ConvAlgo::Auto` (the transforms dominate below).
const MIN_CHANNELS: usize = 16;

/// Whether a convolution of input `[n, c, h, w]` and weight `[o, c, kh, kw]` runs on a kept U in f32.
pub fn keeps_u(x: [usize; 4], wt: [usize; 4], geom: ConvGeom) -> bool {
    keeps_u_in(x, wt, geom, 4)
}

/// `keeps_u` for U kept with `bytes` bytes per value (4: f32, 2: bf16).
fn keeps_u_in(x: [usize; 4], wt: [usize; 4], geom: ConvGeom, bytes: usize) -> bool {
    let [n, c, h, w] = x;
    let [o, _, kh, kw] = wt;
    let tiles = n * h.div_ceil(4) * w.div_ceil(4);
    winograd::applies(kh, kw, geom.stride, geom.padding)
        && 36 * o * c * bytes <= MAX_KEPT_BYTES
        && c.min(o) >= MIN_CHANNELS
        && tiles >= MIN_TILES
        // tiles mostly padding (2x2 and 1x1 maps) do more work than im2col, as in `ConvAlgo::Auto`
        && 8 * tiles <= n * h * w
}

/// How a convolution runs on kept weights.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Algo {
    /// Winograd F(4x4, 3x3) on a kept U.
    Winograd4,
    /// Winograd F(2x2, 3x3) on a kept, packed U (`winograd2`): where F(4x4)'s U is too large to keep.
    Winograd2,
    Im2col,
}

/// Whether a convolution that does not keep F(4x4)'s U runs F(2x2) on a kept U (`bytes` per value): where that
/// U fits `MAX_KEPT_BYTES` (ResNet-34's 512-channel layers in f32: 16.8 MB) and the map is not mostly padding.
fn keeps_u2(x: [usize; 4], wt: [usize; 4], geom: ConvGeom, bytes: usize) -> bool {
    let [_, c, h, w] = x;
    let [o, _, kh, kw] = wt;
    winograd2::applies(kh, kw, geom.stride, geom.padding)
        && 16 * o * c * bytes <= MAX_KEPT_BYTES
        && c.min(o) >= MIN_CHANNELS
        && winograd2::pays(h, w)
}

/// A weight's version and shape, and the algorithm it serves (a weight may meet several if batches of
/// different sizes pass: `keeps_u` counts tiles).
type WeightKey = (u64, [usize; 4], Algo);

/// What is kept of one convolution weight.
enum Kept {
    /// Winograd's U `[36][O][C]`, for CPUs without the packed kernels.
    U(Vec<f32>),
    /// U's 36 planes, packed.
    PackedU(Vec<PackedLhs>),
    /// F(2x2)'s U, 16 planes, packed.
    PackedU2(Vec<PackedLhs>),
    /// The weight as im2col's `[O, C·kh·kw]` left operand, packed.
    Im2col(PackedLhs),
}

/// See the module documentation.
#[derive(Default)]
pub struct PreparedCpu {
    bf16: bool,
    kept: Mutex<HashMap<WeightKey, Arc<Kept>>>,
}

impl PreparedCpu {
    /// Inference in f32.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inference with bf16 convolution operands and f32 accumulation (what PyTorch's bf16 autocast does on a
    /// CPU), or `None` when this CPU lacks AVX512-BF16.
    pub fn bf16() -> Option<Self> {
        packed::bf16_supported().then(|| PreparedCpu { bf16: true, ..Self::default() })
    }

    /// conv2d on the kept weights, then `affine` as the output is written; None where nothing is kept for this
    /// convolution on this CPU (no Winograd U, no AVX-512 for the packed kernels).
    fn conv(&self, x: &Tensor, w: &Tensor, geom: ConvGeom, affine: Option<&Affine>) -> Option<Tensor> {
        let bytes = if self.bf16 { 2 } else { 4 };
        let algo = if keeps_u_in(x.dims4(), w.dims4(), geom, bytes) {
            Algo::Winograd4
        } else if !packed::f32_supported() {
            return None;
        } else if keeps_u2(x.dims4(), w.dims4(), geom, bytes) {
            Algo::Winograd2
        } else {
            Algo::Im2col
        };
        let ([n, c, h, wd], o) = (x.dims4(), w.dims4()[0]);
        let y = match &*self.kept(x.dims4(), w, geom, algo) {
            Kept::U(u) => winograd::forward_with(x.data(), u, (n, c, h, wd, o), affine),
            Kept::PackedU(planes) => winograd::forward_packed(x.data(), planes, (n, c, h, wd, o), affine),
            Kept::PackedU2(planes) => winograd2::forward(x.data(), planes, (n, c, h, wd, o), affine),
            Kept::Im2col(packed) => return Some(conv::forward_packed(x, packed, w.dims4(), geom, affine)),
        };
        Some(Tensor::new(&[n, o, h, wd], y).expect("conv2d output shape matches its data"))
    }

    /// Whether convolutions run in bf16.
    pub fn is_bf16(&self) -> bool {
        self.bf16
    }

    /// The kept form of `w`, built on first use, laid out for the products of input `x`'s shape.
    fn kept(&self, x: [usize; 4], w: &Tensor, geom: ConvGeom, algo: Algo) -> Arc<Kept> {
        const PACKED: &str = "the caller checked that this CPU runs the packed kernels";
        let shape = w.dims4();
        let [o, c, kh, kw] = shape;
        // A poisoned lock only means another thread panicked mid-insert; the map itself is still consistent.
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.entry((w.version(), shape, algo))
            .or_insert_with(|| {
                Arc::new(match algo {
                    Algo::Winograd4 => {
                        let u = winograd::transform_forward_weights(w.data(), o, c);
                        let cols = winograd::product_columns(x[0], c, o, x[2], x[3]);
                        match winograd::pack_forward_weights(&u, o, c, self.bf16, cols) {
                            Some(planes) => Kept::PackedU(planes),
                            None => Kept::U(u),
                        }
                    }
                    Algo::Winograd2 => {
                        let cols = winograd2::product_columns(x[0], x[2], x[3]);
                        Kept::PackedU2(winograd2::pack_weights(w.data(), o, c, self.bf16, cols).expect(PACKED))
                    }
                    Algo::Im2col => {
                        let wm = MatRef::new(w.data(), o, c * kh * kw);
                        let cols = conv::product_columns(x, shape, geom);
                        let packed = if self.bf16 { PackedLhs::bf16(wm, cols) } else { PackedLhs::f32(wm, cols) };
                        Kept::Im2col(packed.expect(PACKED))
                    }
                })
            })
            .clone()
    }
}

impl Backend for PreparedCpu {
    fn name(&self) -> &'static str {
        if self.bf16 { "cpu (prepared, bf16)" } else { "cpu (prepared)" }
    }
    fn conv2d(&self, x: &Tensor, w: &Tensor, geom: ConvGeom) -> Tensor {
        self.conv(x, w, geom, None).unwrap_or_else(|| Cpu.conv2d(x, w, geom))
    }
    fn conv2d_affine_act(&self, x: &Tensor, w: &Tensor, geom: ConvGeom, affine: EvalAffine) -> Tensor {
        let [n, _, h, wd] = x.dims4();
        let [o, _, kh, kw] = w.dims4();
        let (oh, ow) = geom.output_hw(h, wd, kh, kw);
        let fused = Affine::new(affine, [n, o, oh, ow]);
        self.conv(x, w, geom, Some(&fused)).unwrap_or_else(|| Cpu.conv2d_affine_act(x, w, geom, affine))
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
        Cpu.conv2d_backward(x, w, dy, geom, need_dx, need_dw)
    }
    fn batch_norm_train(&self, x: &Tensor, gamma: &[f32], beta: &[f32], eps: f32) -> BatchNormTrain {
        Cpu.batch_norm_train(x, gamma, beta, eps)
    }
    fn affine_act(&self, x: Tensor, scale: &[f32], shift: &[f32], residual: Option<&Tensor>, relu: bool) -> Tensor {
        Cpu.affine_act(x, scale, shift, residual, relu)
    }
    fn batch_norm_backward(&self, dy: &Tensor, x_hat: &Tensor, invstd: &[f32], gamma: &[f32]) -> BatchNormGrads {
        Cpu.batch_norm_backward(dy, x_hat, invstd, gamma)
    }
    fn relu(&self, x: Tensor) -> Tensor {
        Cpu.relu(x)
    }
    fn relu_backward(&self, dy: Tensor, y: &Tensor) -> Tensor {
        Cpu.relu_backward(dy, y)
    }
    fn add_relu(&self, a: Tensor, b: &Tensor) -> Tensor {
        Cpu.add_relu(a, b)
    }
    fn add(&self, a: Tensor, b: &Tensor) -> Tensor {
        Cpu.add(a, b)
    }
    fn max_pool2d(&self, x: &Tensor, kernel: usize, stride: usize, padding: usize) -> (Tensor, Vec<u32>) {
        Cpu.max_pool2d(x, kernel, stride, padding)
    }
    fn max_pool2d_values(&self, x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Tensor {
        Cpu.max_pool2d_values(x, kernel, stride, padding)
    }
    fn max_pool2d_backward(&self, dy: &Tensor, argmax: &[u32], x_shape: [usize; 4]) -> Tensor {
        Cpu.max_pool2d_backward(dy, argmax, x_shape)
    }
    fn global_avg_pool(&self, x: &Tensor) -> Tensor {
        Cpu.global_avg_pool(x)
    }
    fn global_avg_pool_backward(&self, dy: &Tensor, x_shape: [usize; 4]) -> Tensor {
        Cpu.global_avg_pool_backward(dy, x_shape)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, b: &[f32]) -> Tensor {
        Cpu.linear(x, w, b)
    }
    fn linear_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need_dx: bool,
        need_dw: bool,
    ) -> (Option<Tensor>, Option<(Tensor, Vec<f32>)>) {
        Cpu.linear_backward(x, w, dy, need_dx, need_dw)
    }
    fn softmax_cross_entropy(&self, logits: &Tensor, targets: &Tensor) -> (f32, Tensor) {
        Cpu.softmax_cross_entropy(logits, targets)
    }
}
