//! Winograd F(4x4, 3x3) for 3x3 convolutions with stride 1 and padding 1.
//!
//! Each 4x4 block of outputs ("tile") is computed from the 6x6 input patch around it as
//! Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d Bᵀᵀ) ] A, with the matrices of Lavin & Gray (2015) for the points 0, ±1, ±2, ∞.
//! Summing over input channels turns the element-wise product into 36 independent GEMMs, one per position ξ
//! of the 6x6 transformed tile: M[ξ] (O×T) = U[ξ] (O×C) · V[ξ] (C×T), where U = G g Gᵀ is the transformed
//! weight and V = Bᵀ d B the transformed input of T tiles. That is 36 multiplies per 16 outputs instead of 144:
//! 4x fewer than direct convolution. F(4,3) rather than F(2,3) (2.25x) because ResNet's 3x3 layers are
//! compute-bound and the larger tile halves the multiplies again; F(6,3) would save more, but its larger
//! transform coefficients cost more bits in f32, and F(4,3) already measures ~8x im2col's rounding error
//! (1e-6 relative, tests/conv_algos.rs). The cost that does not shrink is U: 36/9 = 4x the kernel, rebuilt every
//! call, which is why `conv` keeps im2col for shapes with few tiles (late layers at small batch).
//!
//! Tiles are numbered image-major, then tile row, then tile column. Work is cut into blocks of whole tile rows
//! (possibly spanning images) so that one block's V ([36][C][Tb]) and M ([36][O][Tb]) stay near the L2 cache
//! while giving each GEMM enough columns; blocks run in parallel, each GEMM on one thread, unless there are
//! fewer blocks than threads, in which case the GEMMs split across the pool instead. Partial tiles (H or W not
//! multiples of 4) read zeros beyond the padded input and drop their outputs beyond the image.
//!
//! Backward data is the same convolution of dY with the kernel rotated 180° and in/out channels swapped.
//! Backward filter follows the chain rule through the same algebra: dM[ξ] = A dY Aᵀ per output tile,
//! dU[ξ] = Σ_t dM[ξ] · V[ξ]ᵀ (a GEMM over tiles), dW = Gᵀ dU G — exact in real arithmetic.
//!
//! The input and output transforms run in f32 and are written lane-wise over runs of tiles, so they
//! vectorise; the weight transforms (once per call, O·C tiles) run in f64 so that U and dW are rounded once.
//!
//! With `Operands::Bf16` (`train --dtype bf16`) the products multiply U, V and dM rounded to bf16 (packed
//! kernels, f32 accumulation). The transforms amplify that rounding as they amplify f32's: 0.9-2.7e-2 from the
//! f64 reference per convolution against im2col's 2-4e-3 in bf16 (tests/conv_algos.rs), which the digits
//! recipe's accuracy does not notice (README, design).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::Operands;
use super::isa::multiversion;
use super::lanes::{deinterleave4, interleave4};
use super::matmul::{MatRef, matmul};
use super::norm::Affine;
use super::packed::{BF16_CHECKED, PackedLhs};
use super::scratch::{self, with_buffer};

/// Transformed-tile positions: 6x6.
const XI: usize = 36;

/// Whether a convolution is one this module computes: 3x3 kernel, stride 1, padding 1.
pub fn applies(kh: usize, kw: usize, stride: (usize, usize), padding: (usize, usize)) -> bool {
    kh == 3 && kw == 3 && stride == (1, 1) && padding == (1, 1)
}

/// Bᵀ applied to a 6-vector (the input transform along one axis).
#[inline(always)]
fn bt(d: [f32; 6]) -> [f32; 6] {
    [
        4.0 * d[0] - 5.0 * d[2] + d[4],
        d[3] + d[4] - 4.0 * (d[1] + d[2]),
        d[4] - d[3] + 4.0 * (d[1] - d[2]),
        d[4] - d[2] + 2.0 * (d[3] - d[1]),
        d[4] - d[2] + 2.0 * (d[1] - d[3]),
        4.0 * d[1] - 5.0 * d[3] + d[5],
    ]
}

/// Aᵀ applied to a 6-vector (the output transform along one axis).
#[inline(always)]
fn at(m: [f32; 6]) -> [f32; 4] {
    let (s12, d12, s34, d34) = (m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]);
    [m[0] + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + m[5]]
}

/// A applied to a 4-vector: the adjoint of `at`, used to carry dY back to the transformed domain.
#[inline(always)]
fn a(y: [f32; 4]) -> [f32; 6] {
    let (e, o) = (y[0] + y[2], y[1] + y[3]);
    let (e4, o4) = (y[0] + 4.0 * y[2], 2.0 * y[1] + 8.0 * y[3]);
    [y[0], e + o, e - o, e4 + o4, e4 - o4, y[3]]
}

/// G, the weight transform along one axis. 1/6, 1/12 and 1/24 are rounded once, in f64.
const G: [[f64; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Kernel pairs one weight-transform task handles, lane-wise.
const PAIRS: usize = 64;

/// Tiles a block aims for, unless `RESNET_WINOGRAD_TILES` (read once, for tuning) says otherwise.
fn block_tiles(c: usize, o: usize) -> usize {
    static OVERRIDE: OnceLock<Option<usize>> = OnceLock::new();
    let forced = *OVERRIDE.get_or_init(|| std::env::var("RESNET_WINOGRAD_TILES").ok().and_then(|v| v.parse().ok()));
    // V and M of one block together in about 1 MiB (the L2 of one core), but never so few tiles that the
    // GEMMs degenerate into matrix-vector products.
    forced.unwrap_or_else(|| ((1 << 20) / (XI * 4 * (c + o).max(1))).clamp(64, 512))
}

/// How one convolution is cut into tile-row blocks and spread over threads.
#[derive(Clone, Copy, Debug)]
struct Plan {
    n: usize,
    c: usize,
    o: usize,
    h: usize,
    w: usize,
    /// Tile rows and columns per image.
    th: usize,
    tw: usize,
    /// Tile rows per block (the last block may have fewer).
    rows: usize,
    blocks: usize,
    gemm_threads: usize,
}

impl Plan {
    fn new(n: usize, c: usize, o: usize, h: usize, w: usize) -> Plan {
        let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
        let total = (n * th).max(1);
        let threads = rayon::current_num_threads().max(1);
        let mut rows = (block_tiles(c, o) / tw.max(1)).clamp(1, total);
        let mut blocks = total.div_ceil(rows);
        let gemm_threads = if blocks >= threads {
            // Round the block count up to a multiple of the thread count so no thread idles at the end.
            rows = total.div_ceil(blocks.div_ceil(threads) * threads);
            blocks = total.div_ceil(rows);
            1
        } else {
            threads
        };
        Plan { n, c, o, h, w, th, tw, rows, blocks, gemm_threads }
    }
    /// Columns (tiles) of a full block's products.
    fn columns(&self) -> usize {
        self.rows.min(self.n * self.th) * self.tw
    }
    /// Global tile rows [first, end) of block b.
    fn block_rows(&self, b: usize) -> (usize, usize) {
        (b * self.rows, ((b + 1) * self.rows).min(self.n * self.th))
    }
}

multiversion! {
/// Pairs t·PAIRS.. of `transform_weights`, into their slice of each of the 36 planes.
fn weight_task(wt: &[f32], c: usize, cols: usize, rotate: bool, t: usize, planes: &mut [&mut [f32]]) {
    let lanes = planes[0].len();
    let mut k = [[0.0f64; PAIRS]; 9];
    for (i, pair) in (t * PAIRS..t * PAIRS + lanes).enumerate() {
        let (r, s) = (pair / cols, pair % cols);
        // output channel r, input channel s of the effective kernel
        let (src, flip) = if rotate { (s * c + r, true) } else { (r * c + s, false) };
        for (j, kj) in wt[src * 9..][..9].iter().enumerate() {
            k[if flip { 8 - j } else { j }][i] = *kj as f64;
        }
    }
    // rows first: h[y][x] = Σ_a G[y][a] k[a][x]
    let mut h = [[[0.0f64; PAIRS]; 3]; 6];
    for x in 0..3 {
        for i in 0..PAIRS {
            let col = g(k[x][i], k[3 + x][i], k[6 + x][i]);
            for (hy, v) in h.iter_mut().zip(col) {
                hy[x][i] = v;
            }
        }
    }
    for (y, hy) in h.iter().enumerate() {
        let mut row_planes = planes[y * 6..y * 6 + 6].iter_mut();
        let [d0, d1, d2, d3, d4, d5]: [&mut [f32]; 6] =
            std::array::from_fn(|_| &mut row_planes.next().expect("6 planes a row")[..lanes]);
        for i in 0..lanes {
            let row = g(hy[0][i], hy[1][i], hy[2][i]);
            (d0[i], d1[i], d2[i], d3[i], d4[i], d5[i]) =
                (row[0] as f32, row[1] as f32, row[2] as f32, row[3] as f32, row[4] as f32, row[5] as f32);
        }
    }
}
}

/// G applied to a 3-vector, using its symmetries (rows 1, 2 and 3, 4 differ only in the sign of the middle tap):
/// 10 operations instead of `G`'s 30, the same values in real arithmetic (each constant rounded once in f64).
#[inline(always)]
fn g(a: f64, b: f64, c: f64) -> [f64; 6] {
    let (e, f, m) = (a + c, a * G[3][0] + c * G[3][2], b * G[3][1]);
    [a * G[0][0], (e + b) * G[1][0], (e - b) * G[1][0], f + m, f - m, c]
}

/// Gᵀ applied to a 6-vector (the adjoint of `g`, for dW = Gᵀ dU G), with the same symmetries.
#[inline(always)]
fn gt(u: [f64; 6]) -> [f64; 3] {
    let (s12, d12, s34, d34) = (u[1] + u[2], u[1] - u[2], u[3] + u[4], u[3] - u[4]);
    [
        u[0] * G[0][0] + s12 * G[1][0] + s34 * G[3][0],
        d12 * G[1][1] + d34 * G[3][1],
        s12 * G[1][2] + s34 * G[3][2] + u[5],
    ]
}

/// U = G g Gᵀ for every (out, in) channel pair of a `[O, C, 3, 3]` weight, laid out `[36][O][C]`.
/// `rotate` transforms the kernel rotated 180° with in/out swapped (`[C, O, 3, 3]` semantics), for dX.
/// f64 inside, so each U entry is rounded once; lane-wise over `PAIRS` pairs so it vectorises and writes
/// each of the 36 planes contiguously.
fn transform_weights(wt: &[f32], o: usize, c: usize, rotate: bool, u: &mut [f32]) {
    let (rows, cols) = if rotate { (c, o) } else { (o, c) };
    let pairs = rows * cols;
    assert_eq!(u.len(), XI * pairs, "U has 36 planes of O·C");
    // The 36 planes of U split into the same pair ranges, so each task owns one range in every plane.
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..pairs.div_ceil(PAIRS)).map(|_| Vec::with_capacity(XI)).collect();
    for plane in u.chunks_mut(pairs.max(1)) {
        for (t, part) in plane.chunks_mut(PAIRS).enumerate() {
            tasks[t].push(part);
        }
    }
    tasks.into_par_iter().enumerate().for_each(|(t, mut planes)| weight_task(wt, c, cols, rotate, t, &mut planes));
}

thread_local! {
    /// U (or the dU partials) kept from one call to the next on the calling thread. At 512x512 channels U is
    /// 37 MB, and faulting in that many fresh pages costs more than the transform that fills them.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A block's V and M, kept for inference for the same reason: at batch 1 a 14x14 layer's whole convolution
    /// is one block, and allocating its 0.6 MB V and M afresh cost a fifth of the call in page faults.
    static BLOCK_V: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static BLOCK_M: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `with_buffer` on the U scratch.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    // U is rebuilt on the calling thread only, and a 37 MB one freed and faulted in again cost the training
    // step a fifth of its time: kept whatever its size.
    with_buffer(&SCRATCH, len, usize::MAX, f)
}

multiversion! {
/// Pairs t·PAIRS.. of `inverse_transform_weights`.
fn inverse_task(du: &[f32], pairs: usize, t: usize, out: &mut [f32]) {
    let (first, lanes) = (t * PAIRS, out.len() / 9);
    // along x: h[y][b] = Σ_x G[x][b] dU[y·6 + x]
    let mut h = [[[0.0f64; PAIRS]; 3]; 6];
    for (y, hy) in h.iter_mut().enumerate() {
        let src: [&[f32]; 6] = std::array::from_fn(|x| &du[(y * 6 + x) * pairs + first..][..lanes]);
        for i in 0..lanes {
            let v = gt(std::array::from_fn(|x| src[x][i] as f64));
            (hy[0][i], hy[1][i], hy[2][i]) = (v[0], v[1], v[2]);
        }
    }
    // along y: dW[a][b] = Σ_y G[y][a] h[y][b]
    for (i, kern) in out.chunks_mut(9).enumerate() {
        for b in 0..3 {
            let v = gt(std::array::from_fn(|y| h[y][b][i]));
            for (a, va) in v.iter().enumerate() {
                kern[a * 3 + b] = *va as f32;
            }
        }
    }
}
}

/// dW = Gᵀ dU G for every pair, from dU laid out `[36][O][C]` to dW `[O, C, 3, 3]`; f64 inside, lane-wise.
fn inverse_transform_weights(du: &[f32], pairs: usize) -> Vec<f32> {
    let mut dw = vec![0.0f32; pairs * 9];
    dw.par_chunks_mut(9 * PAIRS).enumerate().for_each(|(t, out)| inverse_task(du, pairs, t, out));
    dw
}

/// Copies image row `src` into `row` (4·(tiles + 1) entries) shifted right by `pad`, zeros around it, so that
/// tile tx's columns are `row[4tx..4tx + 6]` wherever the tile lies.
#[inline(always)]
fn padded_row(src: Option<&[f32]>, pad: usize, row: &mut [f32]) {
    let Some(src) = src else {
        row.fill(0.0);
        return;
    };
    let used = src.len().min(row.len() - pad);
    row[..pad].fill(0.0);
    row[pad..pad + used].copy_from_slice(&src[..used]);
    row[pad + used..].fill(0.0);
}

/// `K` output rows of length `len`, `stride` apart, from `start`: where one transform pass writes.
#[inline(always)]
fn rows_mut<const K: usize>(v: &mut [f32], start: usize, stride: usize, len: usize) -> [&mut [f32]; K] {
    let mut out: [&mut [f32]; K] = std::array::from_fn(|_| Default::default());
    let mut rest = &mut v[start..];
    for (r, slot) in out.iter_mut().enumerate() {
        let tail = std::mem::take(&mut rest);
        if r + 1 < K {
            let (head, tail) = tail.split_at_mut(stride);
            *slot = &mut head[..len];
            rest = tail;
        } else {
            *slot = &mut tail[..len];
        }
    }
    out
}

/// `K` input rows of length `len`, `stride` apart, from `start`.
#[inline(always)]
fn rows<const K: usize>(v: &[f32], start: usize, stride: usize, len: usize) -> [&[f32]; K] {
    std::array::from_fn(|r| &v[start + r * stride..][..len])
}

/// One pass of a 1-d transform `f` (K inputs, R outputs per lane) over `len` lanes.
#[inline(always)]
fn pass<const K: usize, const R: usize>(src: [&[f32]; K], dst: [&mut [f32]; R], f: impl Fn([f32; K]) -> [f32; R]) {
    let len = dst.iter().map(|d| d.len()).min().unwrap_or(0);
    let src: [&[f32]; K] = std::array::from_fn(|j| &src[j][..len]);
    let mut dst = dst;
    for t in 0..len {
        let r = f(std::array::from_fn(|j| src[j][t]));
        for (d, v) in dst.iter_mut().zip(r) {
            d[t] = v;
        }
    }
}

/// The 36 planes of `v` (`[36][C][tb]`) cut into the channel ranges of `tasks` tasks: per task, its slice of
/// every plane.
fn channel_parts(v: &mut [f32], channels: usize, tb: usize, tasks: usize) -> Vec<(usize, Vec<&mut [f32]>)> {
    let per = channels.div_ceil(tasks.max(1)).max(1);
    let mut parts: Vec<(usize, Vec<&mut [f32]>)> =
        (0..channels.div_ceil(per)).map(|t| (t * per, Vec::with_capacity(XI))).collect();
    for plane in v.chunks_mut((channels * tb).max(1)).take(XI) {
        for (t, part) in plane.chunks_mut(per * tb).enumerate() {
            parts[t].1.push(part);
        }
    }
    parts
}

/// V[ξ][c][t] for the tiles of global tile rows [g0, g1) of `x` into `v` (`[36][C][tb]`), the channels split
/// over `threads` threads: a block alone on the pool (batch 1) would otherwise transform on one of them.
fn input_transform(x: &[f32], p: &Plan, g0: usize, g1: usize, v: &mut [f32], threads: usize) {
    let tb = (g1 - g0) * p.tw;
    let parts = channel_parts(v, p.c, tb, threads);
    if threads > 1 {
        parts.into_par_iter().for_each(|(c0, mut planes)| input_channels(x, p, g0, g1, c0, &mut planes));
    } else {
        for (c0, mut planes) in parts {
            input_channels(x, p, g0, g1, c0, &mut planes);
        }
    }
}

multiversion! {
/// V[ξ][c][t] for channels c0.. (as many as `planes[ξ]` holds rows of tb) and the tiles of global tile rows
/// [g0, g1) of `x` (`[N, C, H, W]`), t counted from g0's first tile. The 6x6 patches are gathered lane-major
/// (d[i·6 + j][t]) so that both transform passes run over all the block's tiles at once: long vectors however
/// narrow the image.
fn input_channels(x: &[f32], p: &Plan, g0: usize, g1: usize, c0: usize, planes: &mut [&mut [f32]]) {
    let (tw, hw) = (p.tw, p.h * p.w);
    let tb = (g1 - g0) * tw;
    let channels = c0..c0 + planes[0].len() / tb.max(1);
    let mut d = vec![0.0f32; XI * tb];
    let mut e = vec![0.0f32; XI * tb];
    // Patch row i of every tile of the block, end to end (4 columns per tile), so that one gather lays them all
    // out lane-major however narrow the image (a 14x14 map has 4 tiles a row); the last tile of each tile row
    // takes its columns 4 and 5 from `last`.
    let mut rows_i = vec![0.0f32; 4 * tb];
    let mut last = vec![[0.0f32; 2]; g1 - g0];
    for c in channels {
        for i in 0..6 {
            for g in g0..g1 {
                let (n, ty) = (g / p.th, g % p.th);
                let plane = &x[(n * p.c + c) * hw..][..hw];
                // padded row 4ty + i is input row 4ty + i − 1; padded column j is input column j − 1
                let r = (4 * ty + i).checked_sub(1).filter(|&r| r < p.h);
                let src = r.map(|r| &plane[r * p.w..][..p.w]);
                padded_row(src, 1, &mut rows_i[(g - g0) * 4 * tw..][..4 * tw]);
                let at = |j: usize| src.and_then(|s| s.get(j - 1)).copied().unwrap_or(0.0);
                last[g - g0] = [at(4 * tw), at(4 * tw + 1)];
            }
            let [d0, d1, d2, d3, d4, d5] = rows_mut::<6>(&mut d, i * 6 * tb, tb, tb);
            // tile k's columns 0..4 are padded columns 4k..4k+4; its columns 4 and 5 are tile k+1's 0 and 1
            deinterleave4(&rows_i, [&mut *d0, &mut *d1, &mut *d2, &mut *d3]);
            d4[..tb - 1].copy_from_slice(&d0[1..]);
            d5[..tb - 1].copy_from_slice(&d1[1..]);
            for (k, [l4, l5]) in last.iter().enumerate() {
                (d4[(k + 1) * tw - 1], d5[(k + 1) * tw - 1]) = (*l4, *l5);
            }
        }
        // along the columns: e[i·6 + ξx] = Σ_j Bᵀ[ξx][j] d[i·6 + j]
        for i in 0..6 {
            pass(rows::<6>(&d, i * 6 * tb, tb, tb), rows_mut::<6>(&mut e, i * 6 * tb, tb, tb), bt);
        }
        // along the rows: V[ξy·6 + ξx] = Σ_i Bᵀ[ξy][i] e[i·6 + ξx]
        for x in 0..6 {
            let mut column = planes.iter_mut().skip(x).step_by(6).map(|plane| &mut plane[(c - c0) * tb..][..tb]);
            let dst: [&mut [f32]; 6] = std::array::from_fn(|_| column.next().expect("36 planes"));
            pass(rows::<6>(&e, x * tb, 6 * tb, tb), dst, bt);
        }
    }
}
}

multiversion! {
/// dM[ξ][o][t] = (A dY Aᵀ)[ξ] for the output tiles of global tile rows [g0, g1) of `dy` (`[N, O, H, W]`),
/// gathered lane-major like `input_transform`.
fn output_grad_transform(dy: &[f32], p: &Plan, g0: usize, g1: usize, dm: &mut [f32]) {
    let (tw, hw) = (p.tw, p.h * p.w);
    let tb = (g1 - g0) * tw;
    let mut d = vec![0.0f32; 16 * tb];
    let mut e = vec![0.0f32; 4 * 6 * tb];
    // row i of every output tile of the block, end to end, gathered at once (as in `input_channels`)
    let mut rows_i = vec![0.0f32; 4 * tb];
    for o in 0..p.o {
        for i in 0..4 {
            for (g, row) in (g0..g1).zip(rows_i.chunks_mut(4 * tw)) {
                let (n, ty) = (g / p.th, g % p.th);
                let plane = &dy[(n * p.o + o) * hw..][..hw];
                let r = Some(4 * ty + i).filter(|&r| r < p.h);
                padded_row(r.map(|r| &plane[r * p.w..][..p.w]), 0, row);
            }
            deinterleave4(&rows_i, rows_mut::<4>(&mut d, i * 4 * tb, tb, tb));
        }
        // along the columns: e[i·6 + ξx] = Σ_j A[ξx][j] d[i·4 + j]
        for i in 0..4 {
            pass(rows::<4>(&d, i * 4 * tb, tb, tb), rows_mut::<6>(&mut e, i * 6 * tb, tb, tb), a);
        }
        // along the rows: dM[ξy·6 + ξx] = Σ_i A[ξy][i] e[i·6 + ξx]
        for x in 0..6 {
            let dst = rows_mut::<6>(dm, x * p.o * tb + o * tb, 6 * p.o * tb, tb);
            pass(rows::<4>(&e, x * tb, 6 * tb, tb), dst, a);
        }
    }
}
}

/// Y = Aᵀ M A for the tiles of global tile rows [g0, g1), written into `out`: for each image the block touches
/// (in order) and each output channel, the rows of that plane the block covers. The output channels are split
/// over `threads` threads, as in `input_transform`.
fn output_transform(
    m: &[f32],
    p: &Plan,
    g0: usize,
    g1: usize,
    out: Vec<&mut [f32]>,
    threads: usize,
    affine: Option<&Affine>,
) {
    let per = p.o.div_ceil(threads.max(1)).max(1);
    let mut parts: Vec<(usize, Vec<&mut [f32]>)> = (0..p.o.div_ceil(per)).map(|t| (t * per, Vec::new())).collect();
    for (i, rows) in out.into_iter().enumerate() {
        parts[i % p.o / per].1.push(rows);
    }
    if threads > 1 {
        parts.into_par_iter().for_each(|(o0, mut out)| output_channels(m, p, g0, g1, o0, per, &mut out, affine));
    } else {
        for (o0, mut out) in parts {
            output_channels(m, p, g0, g1, o0, per, &mut out, affine);
        }
    }
}

multiversion! {
/// `output_transform` for output channels o0..o0 + per (fewer in the last range); `out` holds, for each image
/// the block touches, those channels' rows. Both passes run over all the block's tiles at once; only the final
/// scatter goes tile row by tile row, and applies `affine` to each row as it writes it.
#[allow(clippy::too_many_arguments)]
fn output_channels(
    m: &[f32],
    p: &Plan,
    g0: usize,
    g1: usize,
    o0: usize,
    per: usize,
    out: &mut [&mut [f32]],
    affine: Option<&Affine>,
) {
    let tw = p.tw;
    let tb = (g1 - g0) * tw;
    let n0 = g0 / p.th;
    let count = per.min(p.o - o0);
    let mut s = vec![0.0f32; 6 * 4 * tb];
    let mut q = vec![0.0f32; 16 * tb];
    // output row iy of every tile of the block, end to end (4 columns per tile), from one vector scatter
    let mut rows_out = vec![0.0f32; 4 * tb];
    for o in o0..o0 + count {
        // along the columns: s[ξy·4 + jx] = Σ_ξx Aᵀ[jx][ξx] M[ξy·6 + ξx]
        for y in 0..6 {
            pass(rows::<6>(m, (y * 6 * p.o + o) * tb, p.o * tb, tb), rows_mut::<4>(&mut s, y * 4 * tb, tb, tb), at);
        }
        // along the rows: q[iy·4 + jx] = Σ_ξy Aᵀ[iy][ξy] s[ξy·4 + jx]
        for jx in 0..4 {
            pass(rows::<6>(&s, jx * tb, 4 * tb, tb), rows_mut::<4>(&mut q, jx * tb, 4 * tb, tb), at);
        }
        for iy in 0..4 {
            interleave4(rows::<4>(&q, iy * 4 * tb, tb, tb), &mut rows_out);
            for (g, tiles) in (g0..g1).zip(rows_out.chunks(4 * tw)) {
                let (n, ty) = (g / p.th, g % p.th);
                let row = 4 * ty + iy;
                if row >= p.h {
                    continue;
                }
                // the first tile row of image n inside this block: the output slice starts at its first pixel row
                let first_ty = g0.max(n * p.th) - n * p.th;
                let dst = &mut out[(n - n0) * count + o - o0];
                let drow = &mut dst[(row - 4 * first_ty) * p.w..][..p.w];
                // a partial last tile's columns past the image are dropped
                drow.copy_from_slice(&tiles[..p.w]);
                if let Some(affine) = affine {
                    affine.apply(o, ((n * p.o + o) * p.h + row) * p.w, drow);
                }
            }
        }
    }
}
}

/// For each block, the output rows it writes: per image it touches and per output channel, one slice.
fn split_output<'a>(y: &'a mut [f32], p: &Plan) -> Vec<Vec<&'a mut [f32]>> {
    let mut parts: Vec<Vec<&mut [f32]>> = (0..p.blocks).map(|_| Vec::new()).collect();
    let hw = p.h * p.w;
    for (pi, plane) in y.chunks_mut(hw.max(1)).enumerate() {
        let n = pi / p.o;
        let mut rest = plane;
        let mut g = n * p.th;
        while g < (n + 1) * p.th {
            let b = g / p.rows;
            let end = ((b + 1) * p.rows).min((n + 1) * p.th);
            let pixel_rows = (4 * (end - n * p.th)).min(p.h) - (4 * (g - n * p.th)).min(p.h);
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(pixel_rows * p.w);
            parts[b].push(head);
            rest = tail;
            g = end;
        }
    }
    parts
}

/// M[ξ] = U[ξ] · V[ξ] for one position ξ (`O`×`tb` from `C`×`tb`), however the caller holds U.
type Product<'a> = dyn Fn(usize, MatRef, &mut [f32]) + Sync + 'a;

/// The product for U laid out `[36][O][C]`.
fn plain(u: &[f32], o: usize, c: usize) -> impl Fn(usize, MatRef, &mut [f32]) + Sync + '_ {
    move |xi, v, m| matmul(m, MatRef::new(&u[xi * o * c..][..o * c], o, c), v, false, 1)
}

/// The 36 GEMMs of one block: M[ξ] = U[ξ] · V[ξ]. When the block has the pool to itself (`gemm_threads` > 1)
/// the 36 independent GEMMs are spread over the threads, each on one: a block that small has few tiles, and a
/// GEMM with 16..64 columns split across threads spends more on the split than on the product (one 14x14 image,
/// 256 channels, U kept: 2.1 ms with each GEMM on two threads, 0.9 ms with the GEMMs spread).
fn multiply(product: &Product, v: &[f32], m: &mut [f32], p: &Plan, tb: usize) {
    let (ct, ot) = (p.c * tb, p.o * tb);
    let one = |xi: usize, mx: &mut [f32]| product(xi, MatRef::new(&v[xi * ct..][..ct], p.c, tb), mx);
    let m = &mut m[..XI * ot];
    if p.gemm_threads > 1 {
        m.par_chunks_mut(ot.max(1)).enumerate().for_each(|(xi, mx)| one(xi, mx));
    } else {
        m.chunks_mut(ot.max(1)).enumerate().for_each(|(xi, mx)| one(xi, mx));
    }
}

/// The shared forward pass: y (`[N, O, H, W]`) from x (`[N, C, H, W]`) and the products with U.
/// Temporaries up to `keep_bytes` stay with their thread for the next call (`scratch`).
fn forward_transformed(x: &[f32], product: &Product, p: &Plan, keep_bytes: usize, affine: Option<&Affine>) -> Vec<f32> {
    let mut y = vec![0.0f32; p.n * p.o * p.h * p.w];
    if y.is_empty() {
        return y;
    }
    let parts = split_output(&mut y, p);
    let run = |b: usize, out: Vec<&mut [f32]>| {
        let (g0, g1) = p.block_rows(b);
        let tb = (g1 - g0) * p.tw;
        with_buffer(&BLOCK_V, XI * p.c * tb, keep_bytes, |v| {
            with_buffer(&BLOCK_M, XI * p.o * tb, keep_bytes, |m| {
                input_transform(x, p, g0, g1, v, p.gemm_threads);
                multiply(product, v, m, p, tb);
                output_transform(m, p, g0, g1, out, p.gemm_threads, affine);
            })
        })
    };
    if p.gemm_threads > 1 {
        for (b, out) in parts.into_iter().enumerate() {
            run(b, out);
        }
    } else {
        parts.into_par_iter().enumerate().for_each(|(b, out)| run(b, out));
    }
    y
}

/// y = conv2d(x, w) with a 3x3 kernel, stride 1, padding 1. x is `[n, c, h, w]`, wt `[o, c, 3, 3]`. With
/// `Operands::Bf16` the products multiply U and V rounded to bf16 and accumulate in f32 (the transforms stay f32).
pub fn forward(x: &[f32], wt: &[f32], shape: Shape, operands: Operands) -> Vec<f32> {
    let (n, c, h, w, o) = shape;
    with_scratch(XI * o * c, |u| {
        transform_weights(wt, o, c, false, u);
        transformed_product(x, u, &Plan::new(n, c, o, h, w), operands)
    })
}

/// `forward_transformed` with U (`[36][p.o][p.c]`, rebuilt for this call) as `operands` say.
fn transformed_product(x: &[f32], u: &[f32], p: &Plan, operands: Operands) -> Vec<f32> {
    match operands {
        Operands::F32 => forward_transformed(x, &plain(u, p.o, p.c), p, 0, None),
        Operands::Bf16 => {
            let planes = pack_forward_weights(u, p.o, p.c, true, p.columns()).expect(BF16_CHECKED);
            let product = |xi: usize, v: MatRef, m: &mut [f32]| planes[xi].multiply(v, m);
            forward_transformed(x, &product, p, 0, None)
        }
    }
}

/// U (`[36][O][C]`) of a `[o, c, 3, 3]` weight: what `forward` rebuilds on every call, for callers whose weights
/// do not change between calls (inference) and that keep it for `forward_with`.
pub fn transform_forward_weights(wt: &[f32], o: usize, c: usize) -> Vec<f32> {
    assert_eq!(wt.len(), o * c * 9, "a [o, c, 3, 3] weight");
    let mut u = vec![0.0f32; XI * o * c];
    transform_weights(wt, o, c, false, &mut u);
    u
}

/// The shape of a forward pass: batch, input channels, height, width, output channels.
pub type Shape = (usize, usize, usize, usize, usize);

/// `forward` with U from `transform_forward_weights` (without `affine`: the same result, bit for bit), then
/// `affine` applied to each output row as it is written.
pub fn forward_with(x: &[f32], u: &[f32], shape: Shape, affine: Option<&Affine>) -> Vec<f32> {
    let (n, c, h, w, o) = shape;
    assert_eq!(u.len(), XI * o * c, "U has 36 planes of O·C");
    assert_eq!(x.len(), n * c * h * w, "x is [n, c, h, w]");
    forward_transformed(x, &plain(u, o, c), &Plan::new(n, c, o, h, w), scratch::INFERENCE_KEEP, affine)
}

/// Columns of the products (tiles per block) of a forward pass on `[n, c, h, w]` with `o` outputs.
pub fn product_columns(n: usize, c: usize, o: usize, h: usize, w: usize) -> usize {
    Plan::new(n, c, o, h, w).columns()
}

/// U's 36 planes packed for `packed::PackedLhs` (in bf16 when `bf16`) for products of about `cols` columns
/// (`product_columns`), or `None` where this CPU lacks the kernel.
pub fn pack_forward_weights(u: &[f32], o: usize, c: usize, bf16: bool, cols: usize) -> Option<Vec<PackedLhs>> {
    assert_eq!(u.len(), XI * o * c, "U has 36 planes of O·C");
    let pack = if bf16 { PackedLhs::bf16 } else { PackedLhs::f32 };
    u.chunks(o * c).map(|plane| pack(MatRef::new(plane, o, c), cols)).collect()
}

/// `forward_with` with U packed by `pack_forward_weights` (in f32: the same result up to summation order).
pub fn forward_packed(x: &[f32], planes: &[PackedLhs], shape: Shape, affine: Option<&Affine>) -> Vec<f32> {
    let (n, c, h, w, o) = shape;
    assert!(planes.len() == XI && planes.iter().all(|u| u.rows() == o && u.depth() == c), "36 planes of O×C");
    assert_eq!(x.len(), n * c * h * w, "x is [n, c, h, w]");
    let product = |xi: usize, v: MatRef, m: &mut [f32]| planes[xi].multiply(v, m);
    forward_transformed(x, &product, &Plan::new(n, c, o, h, w), scratch::INFERENCE_KEEP, affine)
}

/// dX for y = conv2d(x, w): the same convolution of dY with the kernel rotated and its channels swapped.
/// dy is `[n, o, h, w]`, wt `[o, c, 3, 3]`; the result is `[n, c, h, w]`. `operands` as in `forward`.
pub fn backward_data(dy: &[f32], wt: &[f32], shape: Shape, operands: Operands) -> Vec<f32> {
    let (n, c, h, w, o) = shape;
    with_scratch(XI * o * c, |u| {
        transform_weights(wt, o, c, true, u);
        transformed_product(dy, u, &Plan::new(n, o, c, h, w), operands)
    })
}

/// dW (`[o, c, 3, 3]`) for y = conv2d(x, w), from x (`[n, c, h, w]`) and dy (`[n, o, h, w]`). With
/// `Operands::Bf16` each block's dM[ξ] and V[ξ] are rounded to bf16 for their product, summed in f32.
pub fn backward_filter(x: &[f32], dy: &[f32], shape: Shape, operands: Operands) -> Vec<f32> {
    let (n, c, h, w, o) = shape;
    let p = Plan::new(n, c, o, h, w);
    let pairs = o * c;
    if n * h * w == 0 || pairs == 0 {
        return vec![0.0; pairs * 9];
    }
    let threads = if p.gemm_threads > 1 { 1 } else { rayon::current_num_threads().max(1) };
    let per_task = p.blocks.div_ceil(threads);
    let tasks = p.blocks.div_ceil(per_task);
    with_scratch(tasks * XI * pairs, |partials| {
        partials.par_chunks_mut(XI * pairs).enumerate().for_each(|(t, du)| {
            let (mut v, mut dm) = (Vec::new(), Vec::new());
            for (i, b) in (t * per_task..((t + 1) * per_task).min(p.blocks)).enumerate() {
                let (g0, g1) = p.block_rows(b);
                let tb = (g1 - g0) * p.tw;
                v.resize(XI * c * tb, 0.0);
                dm.resize(XI * o * tb, 0.0);
                input_transform(x, &p, g0, g1, &mut v, p.gemm_threads);
                output_grad_transform(dy, &p, g0, g1, &mut dm);
                let one = |xi: usize, dux: &mut [f32]| {
                    let dmm = MatRef::new(&dm[xi * o * tb..][..o * tb], o, tb);
                    let vm = MatRef::new(&v[xi * c * tb..][..c * tb], c, tb);
                    // the first block overwrites whatever the scratch held
                    match operands {
                        Operands::F32 => matmul(dux, dmm, vm.t(), i > 0, 1),
                        Operands::Bf16 => {
                            let dmm = PackedLhs::bf16(dmm, c).expect(BF16_CHECKED);
                            if i > 0 { dmm.multiply_add_threads(vm.t(), dux, 1) } else { dmm.multiply(vm.t(), dux) }
                        }
                    }
                };
                // as in `multiply`: a lone task spreads its 36 GEMMs over the pool
                if p.gemm_threads > 1 {
                    du.par_chunks_mut(pairs).enumerate().for_each(|(xi, dux)| one(xi, dux));
                } else {
                    du.chunks_mut(pairs).enumerate().for_each(|(xi, dux)| one(xi, dux));
                }
            }
        });
        let (du, rest) = partials.split_at_mut(XI * pairs);
        for part in rest.chunks(XI * pairs) {
            du.iter_mut().zip(part).for_each(|(t, s)| *t += s);
        }
        inverse_transform_weights(du, pairs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 3x3/s1/p1 correlation in f64, with its gradients for `dy`: (y, dx, dw).
    #[allow(clippy::type_complexity)]
    fn naive(
        x: &[f32],
        wt: &[f32],
        dy: &[f32],
        (n, c, h, w, o): (usize, usize, usize, usize, usize),
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut y, mut dx, mut dw) = (vec![0.0f64; n * o * h * w], vec![0.0f64; x.len()], vec![0.0f64; wt.len()]);
        for b in 0..n {
            for oc in 0..o {
                for i in 0..h {
                    for j in 0..w {
                        let yi = ((b * o + oc) * h + i) * w + j;
                        for ic in 0..c {
                            for ki in 0..3 {
                                for kj in 0..3 {
                                    let (r, q) = ((i + ki).wrapping_sub(1), (j + kj).wrapping_sub(1));
                                    if r < h && q < w {
                                        let (xi, wi) =
                                            (((b * c + ic) * h + r) * w + q, ((oc * c + ic) * 3 + ki) * 3 + kj);
                                        y[yi] += x[xi] as f64 * wt[wi] as f64;
                                        dx[xi] += dy[yi] as f64 * wt[wi] as f64;
                                        dw[wi] += dy[yi] as f64 * x[xi] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw)
    }

    fn rel(a: &[f32], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-300)).sqrt()
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn one_dimensional_transforms_compute_a_correlation() {
        // y = Aᵀ[(G g) ⊙ (Bᵀ d)] must equal y_i = Σ_k d_{i+k} g_k for every basis pair.
        for di in 0..6 {
            for gk in 0..3 {
                let mut d = [0.0f32; 6];
                d[di] = 1.0;
                let mut k = [0.0f64; 3];
                k[gk] = 1.0;
                let u: [f64; 6] = std::array::from_fn(|r| (0..3).map(|j| G[r][j] * k[j]).sum());
                let v = bt(d);
                let y = at(std::array::from_fn(|i| u[i] as f32 * v[i]));
                for (i, yi) in y.iter().enumerate() {
                    let want = if i + gk == di { 1.0 } else { 0.0 };
                    assert!((yi - want).abs() < 1e-6, "d{di} g{gk} y{i}: {yi} vs {want}");
                }
            }
        }
    }

    #[test]
    fn forward_and_gradients_match_direct_convolution() {
        // the last is wide enough (38 tiles) for the vector gather of 16-tile groups and its scalar rest
        let shapes =
            [(1, 1, 1, 1, 1), (2, 3, 2, 3, 5), (1, 5, 5, 7, 3), (3, 7, 13, 14, 6), (2, 4, 7, 7, 9), (1, 2, 5, 150, 3)];
        for (seed, &(n, c, h, w, o)) in shapes.iter().enumerate() {
            let x = values(n * c * h * w, seed as u64 + 1);
            let wt = values(o * c * 9, seed as u64 + 100);
            let dy = values(n * o * h * w, seed as u64 + 200);
            let (want_y, want_dx, want_dw) = naive(&x, &wt, &dy, (n, c, h, w, o));
            let e = rel(&forward(&x, &wt, (n, c, h, w, o), Operands::F32), &want_y);
            assert!(e < 1e-5, "{:?} forward: {e:.2e}", (n, c, h, w, o));
            let e = rel(&backward_data(&dy, &wt, (n, c, h, w, o), Operands::F32), &want_dx);
            assert!(e < 1e-5, "{:?} dx: {e:.2e}", (n, c, h, w, o));
            let e = rel(&backward_filter(&x, &dy, (n, c, h, w, o), Operands::F32), &want_dw);
            assert!(e < 1e-5, "{:?} dw: {e:.2e}", (n, c, h, w, o));
        }
    }
}
