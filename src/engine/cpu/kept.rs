//! A convolution weight kept in the form its inference algorithm multiplies with (`algo::KeptAlgo`): Winograd's
//! transformed weight U (packed for `packed::PackedLhs` on CPUs with AVX-512), F(2x2)'s packed U, or the weight
//! packed as im2col's left operand. Built once, run on every call, so later calls skip the transform and the
//! packing and only stream the kept values. In bf16 the kept values and each call's transformed input or im2col
//! columns are rounded to bf16 and multiplied with f32 accumulation; everything between convolutions stays f32.
//! This layer knows tensors and shapes only; `exec::cpu_plan` decides which weights to keep and for how long.

use super::algo::KeptAlgo;
use super::matmul::MatRef;
use super::norm::Affine;
use super::packed::PackedLhs;
use super::{conv, winograd, winograd2};
use crate::engine::{ConvGeom, Tensor};

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

pub struct KeptConv {
    kept: Kept,
    /// The weight's `[O, C, kh, kw]` and the convolution's geometry.
    shape: [usize; 4],
    geom: ConvGeom,
}

impl KeptConv {
    /// Keep `w` for `algo` (from `algo::for_inference`, which checked that this CPU runs it), laid out for the
    /// products of inputs shaped like `x` (any other input shape still computes correctly).
    pub fn new(x: [usize; 4], w: &Tensor, geom: ConvGeom, algo: KeptAlgo, bf16: bool) -> KeptConv {
        const PACKED: &str = "algo::for_inference chose a packed form only where this CPU runs the packed kernels";
        let shape = w.dims4();
        let [o, c, kh, kw] = shape;
        let kept = match algo {
            KeptAlgo::Winograd4 => {
                let u = winograd::transform_forward_weights(w.data(), o, c);
                let cols = winograd::product_columns(x[0], c, o, x[2], x[3]);
                match winograd::pack_forward_weights(&u, o, c, bf16, cols) {
                    Some(planes) => Kept::PackedU(planes),
                    None => Kept::U(u),
                }
            }
            KeptAlgo::Winograd2 => {
                let cols = winograd2::product_columns(x[0], x[2], x[3]);
                Kept::PackedU2(winograd2::pack_weights(w.data(), o, c, bf16, cols).expect(PACKED))
            }
            KeptAlgo::Im2col => {
                let wm = MatRef::new(w.data(), o, c * kh * kw);
                let cols = conv::product_columns(x, shape, geom);
                let packed = if bf16 { PackedLhs::bf16(wm, cols) } else { PackedLhs::f32(wm, cols) };
                Kept::Im2col(packed.expect(PACKED))
            }
        };
        KeptConv { kept, shape, geom }
    }

    /// conv2d of `x` with the kept weight, then `affine` as the output is written.
    pub fn forward(&self, x: &Tensor, affine: Option<&Affine>) -> Tensor {
        let ([n, c, h, wd], o) = (x.dims4(), self.shape[0]);
        let y = match &self.kept {
            Kept::U(u) => winograd::forward_with(x.data(), u, (n, c, h, wd, o), affine),
            Kept::PackedU(planes) => winograd::forward_packed(x.data(), planes, (n, c, h, wd, o), affine),
            Kept::PackedU2(planes) => winograd2::forward(x.data(), planes, (n, c, h, wd, o), affine),
            Kept::Im2col(packed) => return conv::forward_packed(x, packed, self.shape, self.geom, affine),
        };
        Tensor::new(&[n, o, h, wd], y).expect("conv2d output shape matches its data")
    }
}
