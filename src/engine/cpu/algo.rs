//! Which algorithm a convolution runs: the one place that chooses, for training and for inference.
//!
//! Training (`resolve`, `ConvAlgo`): the weights change every step, so Winograd's transformed weight U is
//! rebuilt on every call and must pay for itself at each shape; `RESNET_CONV_ALGO=im2col|winograd|auto` (read
//! once; default auto) forces one algorithm everywhere it applies, for benchmarking; tests pick one per call.
//!
//! Inference (`for_inference`, `KeptAlgo`): the weights stay fixed while a plan holds them, so U (or the packed
//! im2col weight) is built once per convolution and kept (`kept::KeptConv`). Rebuilding U costs the same
//! whatever the batch, so at batch 1 it is most of a Winograd convolution and `ConvAlgo::Auto` must keep the
//! 14x14 and 28x28 layers on im2col; with U kept, Winograd's 4x fewer multiplies win there too (and at batch 8
//! the 14x14 layers gain a third). U is 4x the kernel (36 transformed taps for 9), so only convolutions whose U
//! stays under `MAX_KEPT_BYTES` keep it: in f32 on ResNet-34 every 3x3 layer up to 256 channels (124 MB in
//! all) but not the 512-channel ones (37.7 MB each, 189 MB for five), which would gain about 7 ms each at batch
//! 8 but take peak memory past half of PyTorch's; they run F(2x2, 3x3) on a kept U instead. In bf16 U takes
//! half the bytes and those are kept too (18.9 MB each).

use std::sync::OnceLock;

use super::{packed, winograd, winograd2};
use crate::engine::ConvGeom;

/// Which algorithm computes a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAlgo {
    /// Per shape: Winograd where it applies and pays, im2col + GEMM otherwise.
    Auto,
    Im2col,
    /// Winograd F(4x4, 3x3) where it applies (3x3, stride 1, padding 1); im2col for every other shape.
    Winograd,
}

/// The process-wide default: `RESNET_CONV_ALGO`, or `Auto`.
pub(super) fn default_algo() -> ConvAlgo {
    static ALGO: OnceLock<ConvAlgo> = OnceLock::new();
    *ALGO.get_or_init(|| match std::env::var("RESNET_CONV_ALGO").as_deref() {
        Ok("im2col") => ConvAlgo::Im2col,
        Ok("winograd") => ConvAlgo::Winograd,
        _ => ConvAlgo::Auto,
    })
}

/// What `algo` resolves to for input `[n, c, h, w]` and weight `[o, c, kh, kw]`: `Im2col` or `Winograd`.
pub fn resolve(algo: ConvAlgo, x: [usize; 4], wt: [usize; 4], geom: ConvGeom) -> ConvAlgo {
    let [n, c, h, w] = x;
    let [o, _, kh, kw] = wt;
    if !winograd::applies(kh, kw, geom.stride, geom.padding) {
        return ConvAlgo::Im2col;
    }
    match algo {
        ConvAlgo::Auto => {
            let tiles = n * h.div_ceil(4) * w.div_ceil(4);
            // 36 multiplies per tile against im2col's 9 per output: on maps whose tiles are mostly padding
            // (2x2, 1x1) Winograd does as much or more work, so it must at least halve the multiplies. Measured on
            // the digits recipe's step (8x8 input, so 2x2 and 1x1 maps in layer3/4): 1,100 ms without this
            // condition, 450 with it, 530 all-im2col.
            let pays = 8 * tiles <= n * h * w;
            if pays && tiles >= AUTO_MIN_TILES && c.min(o) >= AUTO_MIN_CHANNELS {
                ConvAlgo::Winograd
            } else {
                ConvAlgo::Im2col
            }
        }
        chosen => chosen,
    }
}

/// Below this many 4x4 output tiles Winograd's transformed weights (4x the kernel, rebuilt every call) cost more
/// to build and stream than the multiplies they save. Measured on 2 threads: 49 tiles (one 28x28 image, 128
/// channels) 2.5 ms vs im2col's 1.9; 64 tiles (64 4x4 images, 512 channels) 26 ms vs 40.
const AUTO_MIN_TILES: usize = 64;

/// With fewer input or output channels the GEMMs are tiny and the transforms, which scale with C + O rather
/// than C·O, cost about as much as im2col's whole product (measured: a 3-channel stem runs 1.6x slower, 8
/// channels break even forward). Winograd's ~8x larger rounding error then buys nothing, and narrow networks
/// can be ill-conditioned enough to show it: tests/net_parity's reduced ResNet-50 (4..32 channels) gets an
/// input gradient 1.3e-2 from PyTorch's with its 8-channel layers on Winograd, 1.2e-5 on im2col.
const AUTO_MIN_CHANNELS: usize = 16;

/// The kept algorithm for an inference convolution of input `x` and weight `wt`, with kept values of `bytes`
/// bytes (4: f32, 2: bf16); None where nothing is kept on this CPU (no Winograd U, no F(2x2) that pays, and no
/// packed kernels for im2col's weight): the convolution then runs as in training.
pub fn for_inference(x: [usize; 4], wt: [usize; 4], geom: ConvGeom, bytes: usize) -> Option<KeptAlgo> {
    if keeps_u_in(x, wt, geom, bytes) {
        Some(KeptAlgo::Winograd4)
    } else if keeps_u2(x, wt, geom, bytes) && u2_runs(x, bytes) {
        Some(KeptAlgo::Winograd2)
    } else if packed::f32_supported() {
        Some(KeptAlgo::Im2col)
    } else {
        None
    }
}

/// Whether F(2x2) on a kept U runs here, in f32 (`bytes` 4) or bf16. Without the packed kernels its 16 products
/// go through `gemm`, which packs each U plane again on every
/// call: that pays only with enough columns to spread it over. Measured on ResNet-34 at 224² (2 threads,
/// `gemm` without AVX-512 and `RESNET_CPU=avx2`): batch 8 (128 columns in layer4) 228 → 210 ms, batch 1 (16
/// columns) 39 → 43 ms.
fn u2_runs(x: [usize; 4], bytes: usize) -> bool {
    match bytes {
        4 => packed::f32_supported() || winograd2::product_columns(x[0], x[2], x[3]) >= 128,
        _ => packed::bf16_supported(),
    }
}

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

/// How an inference convolution runs on weights kept across calls (`kept::KeptConv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeptAlgo {
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
