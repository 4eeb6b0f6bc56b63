//! Batch normalisation over N, H and W for each channel. Sums are accumulated in f64 so that large batches
//! (N·H·W in the millions) keep the mean and variance as accurate as PyTorch's.

use rayon::prelude::*;

use super::isa::multiversion;

use crate::engine::Tensor;
use crate::engine::backend::{BatchNormSums, BatchStats, EvalAffine};

/// Σ over channel ch's planes of f(x, y) for two tensors of equal NCHW shape.
fn channel_sum(a: &[f32], b: &[f32], c: usize, hw: usize, ch: usize, f: impl Fn(f32, f32) -> f64) -> f64 {
    let planes = a.len() / (c * hw).max(1);
    (0..planes)
        .map(|n| {
            let off = (n * c + ch) * hw;
            lanes_sum(&a[off..off + hw], &b[off..off + hw], &f)
        })
        .sum()
}

/// Σ f(a[i], b[i]) in f64 as 8 interleaved partial sums (lane i mod 8) added pairwise at the end. One chain of
/// dependent f64 adds runs at one value per add latency (3-4 cycles); eight independent ones vectorise (the
/// closures of `stats` and `grad_sums` were 10 % of a CIFAR training step's samples with one chain, 8 % with
/// eight: ResNet-34, batch 64, AMD EPYC, 2 threads).
fn lanes_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ac.remainder().iter().zip(bc.remainder()).map(|(&p, &q)| f(p, q)).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += f(x[l], y[l]);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Per channel: the count, the mean and Σ(x − mean)², in two passes (as PyTorch's CPU kernel does).
pub fn stats(x: &Tensor) -> BatchStats {
    let [n, c, h, w] = x.dims4();
    let hw = h * w;
    let count = (n * hw).max(1) as f64;
    let xs = x.data();
    let (mean, m2) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mean = channel_sum(xs, xs, c, hw, ch, |v, _| v as f64) / count;
            (mean, channel_sum(xs, xs, c, hw, ch, |v, _| (v as f64 - mean).powi(2)))
        })
        .unzip();
    BatchStats { count: (n * hw) as f64, mean, m2 }
}

/// y = x̂·γ + β with x̂ = (x − mean)·invstd per channel; returns (y, x̂).
pub fn normalize(x: &Tensor, mean: &[f32], invstd: &[f32], gamma: &[f32], beta: &[f32]) -> (Tensor, Tensor) {
    let [_, c, h, w] = x.dims4();
    assert!(
        [mean.len(), invstd.len(), gamma.len(), beta.len()].iter().all(|&l| l == c),
        "batch norm: {c} channels but {} parameters",
        gamma.len()
    );
    let hw = h * w;
    let xs = x.data();
    let mut y = vec![0.0f32; xs.len()];
    let mut x_hat = vec![0.0f32; xs.len()];
    if hw > 0 {
        let k: Vec<[f32; 4]> = (0..c).map(|ch| [mean[ch], invstd[ch], gamma[ch], beta[ch]]).collect();
        let run = CHUNK.div_ceil(hw) * hw;
        y.par_chunks_mut(run)
            .zip(x_hat.par_chunks_mut(run))
            .zip(xs.par_chunks(run))
            .enumerate()
            .for_each(|(t, ((yp, hp), xp))| normalize_planes(yp, hp, xp, hw, t * run / hw, &k));
    }
    (Tensor::new(x.shape(), y).expect("same shape as x"), Tensor::new(x.shape(), x_hat).expect("same shape as x"))
}

multiversion! {
/// Planes of `hw` values from plane `first` on, of `normalize`: x̂ = (x − mean)·invstd, y = x̂·γ + β, with
/// `k[channel]` = [mean, invstd, γ, β]. A run of planes per call (and per parallel task): on 2x2 maps a plane
/// is 4 values, too few to pay for a task or a dispatch each.
fn normalize_planes(y: &mut [f32], x_hat: &mut [f32], x: &[f32], hw: usize, first: usize, k: &[[f32; 4]]) {
    for (i, ((yp, hp), xp)) in y.chunks_mut(hw).zip(x_hat.chunks_mut(hw)).zip(x.chunks(hw)).enumerate() {
        let k = k[(first + i) % k.len()];
        for ((yv, hv), &xv) in yp.iter_mut().zip(hp.iter_mut()).zip(xp) {
            *hv = (xv - k[0]) * k[1];
            *yv = *hv * k[2] + k[3];
        }
    }
}
}

/// Values per parallel task: whole planes, enough of them that rayon's per-task cost stays small on the
/// 7x7 maps of the last stage.
const CHUNK: usize = 1 << 14;

pub fn affine_act(mut x: Tensor, scale: &[f32], shift: &[f32], residual: Option<&Tensor>, relu: bool) -> Tensor {
    let [_, c, h, w] = x.dims4();
    assert!(scale.len() == c && shift.len() == c, "affine: {c} channels but {} scales", scale.len());
    if let Some(r) = residual {
        assert_eq!(r.shape(), x.shape(), "affine: residual and input differ in shape");
    }
    let hw = h * w;
    if hw == 0 {
        return x;
    }
    let planes = CHUNK.div_ceil(hw);
    let residual = residual.map(Tensor::data);
    x.data_mut().par_chunks_mut(planes * hw).enumerate().for_each(|(t, xs)| {
        for (i, y) in xs.chunks_mut(hw).enumerate() {
            let p = t * planes + i;
            let (a, b) = (scale[p % c], shift[p % c]);
            let r = residual.map(|r| &r[p * hw..(p + 1) * hw]);
            if relu { affine_plane::<true>(y, r, a, b) } else { affine_plane::<false>(y, r, a, b) }
        }
    });
    x
}

/// Inference's per-channel affine map, applied by a convolution to the values it has just written
/// (`Backend::conv2d_affine_act`): relu?(y·scale[o] + shift[o] + residual?).
#[derive(Clone, Copy)]
pub struct Affine<'a> {
    scale: &'a [f32],
    shift: &'a [f32],
    /// The whole residual, laid out as the convolution's output.
    residual: Option<&'a [f32]>,
    relu: bool,
}

impl<'a> Affine<'a> {
    /// Checked against the output's shape `[n, o, h, w]`.
    pub fn new(e: EvalAffine<'a>, out: [usize; 4]) -> Affine<'a> {
        let [n, o, h, w] = out;
        assert!(e.scale.len() == o && e.shift.len() == o, "affine: {o} channels but {} scales", e.scale.len());
        if let Some(r) = e.residual {
            assert_eq!(r.shape(), out, "affine: residual and output differ in shape");
        }
        debug_assert!(e.residual.is_none_or(|r| r.numel() == n * o * h * w));
        Affine { scale: e.scale, shift: e.shift, residual: e.residual.map(Tensor::data), relu: e.relu }
    }

    /// Applies the map to `y`, values of output channel `o` that start at flat index `at` of the output.
    pub fn apply(&self, o: usize, at: usize, y: &mut [f32]) {
        let r = self.residual.map(|r| &r[at..at + y.len()]);
        let (a, b) = (self.scale[o], self.shift[o]);
        if self.relu { affine_plane::<true>(y, r, a, b) } else { affine_plane::<false>(y, r, a, b) }
    }
}

/// One plane, with the ReLU decided at compile time so that each variant's loop vectorises.
fn affine_plane<const RELU: bool>(y: &mut [f32], residual: Option<&[f32]>, a: f32, b: f32) {
    let act = |s: f32| if RELU { super::relu1(s) } else { s };
    match residual {
        Some(r) => y.iter_mut().zip(r).for_each(|(v, &r)| *v = act(*v * a + b + r)),
        None => y.iter_mut().for_each(|v| *v = act(*v * a + b)),
    }
}

/// Per channel: Σdy and Σ(dy·x̂).
pub fn grad_sums(dy: &Tensor, x_hat: &Tensor) -> BatchNormSums {
    let [_, c, h, w] = dy.dims4();
    assert_eq!(dy.shape(), x_hat.shape(), "batch norm backward: dy and x_hat differ in shape");
    let hw = h * w;
    let (dys, xh) = (dy.data(), x_hat.data());
    let (dy, dy_xhat) = (0..c)
        .into_par_iter()
        .map(|ch| {
            (channel_sum(dys, xh, c, hw, ch, |g, _| g as f64), channel_sum(dys, xh, c, hw, ch, |g, v| (g * v) as f64))
        })
        .unzip();
    BatchNormSums { dy, dy_xhat }
}

multiversion! {
/// Planes of `hw` values from plane `first` on, of `grad_input`, with `k[channel]` = [γ·invstd/M, M, Σdy,
/// Σ(dy·x̂)]; a run per call as in `normalize_planes`.
fn grad_input_planes(dx: &mut [f32], dy: &[f32], x_hat: &[f32], hw: usize, first: usize, k: &[[f64; 4]]) {
    for (i, ((dp, gp), vp)) in dx.chunks_mut(hw).zip(dy.chunks(hw)).zip(x_hat.chunks(hw)).enumerate() {
        let k = k[(first + i) % k.len()];
        for ((d, &g), &v) in dp.iter_mut().zip(gp).zip(vp) {
            *d = (k[0] * (k[1] * g as f64 - k[2] - v as f64 * k[3])) as f32;
        }
    }
}
}

/// With M = `count` (the whole batch's, over every replica): dx = γ·invstd/M · (M·dy − Σdy − x̂·Σ(dy·x̂)).
pub fn grad_input(
    dy: &Tensor,
    x_hat: &Tensor,
    invstd: &[f32],
    gamma: &[f32],
    sums: &BatchNormSums,
    count: f64,
) -> Tensor {
    let [_, c, h, w] = dy.dims4();
    assert_eq!(dy.shape(), x_hat.shape(), "batch norm backward: dy and x_hat differ in shape");
    assert!(sums.dy.len() == c && sums.dy_xhat.len() == c, "batch norm backward: {c} channels, {} sums", sums.dy.len());
    let hw = h * w;
    let count = count.max(1.0);
    let (dys, xh) = (dy.data(), x_hat.data());
    let mut dx = vec![0.0f32; dys.len()];
    if hw > 0 {
        let k: Vec<[f64; 4]> = (0..c)
            .map(|ch| [gamma[ch] as f64 * invstd[ch] as f64 / count, count, sums.dy[ch], sums.dy_xhat[ch]])
            .collect();
        let run = CHUNK.div_ceil(hw) * hw;
        dx.par_chunks_mut(run)
            .zip(dys.par_chunks(run))
            .zip(xh.par_chunks(run))
            .enumerate()
            .for_each(|(t, ((dxp, dyp), xp))| grad_input_planes(dxp, dyp, xp, hw, t * run / hw, &k));
    }
    Tensor::new(dy.shape(), dx).expect("same shape as dy")
}
