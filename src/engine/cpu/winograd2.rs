//! Winograd F(2x2, 3x3) for inference, where F(4x4, 3x3)'s transformed weights would be too large to keep.
//!
//! Each 2x2 block of outputs comes from the 4x4 input patch around it: Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A with
//! the matrices of Lavin & Gray (2015) for the points 0, ±1, ∞. Summed over input channels that is 16 GEMMs,
//! M[ξ] (O×T) = U[ξ] (O×C) · V[ξ] (C×T): 16 multiplies per 4 outputs instead of 36, 2.25x fewer than direct
//! convolution (F(4x4) saves 4x). Its transformed weight is 16/9 of the kernel where F(4x4)'s is 4x: on
//! ResNet-34's 512-channel layers 16.8 MB per layer instead of 37.7, small enough to keep in f32 (see
//! `prepared`). Its transforms add and halve only, so its rounding is close to im2col's.
//!
//! Images are taken in blocks of whole images (about `BLOCK_TILES` tiles); within a block the input transform
//! runs over channels, the 16 GEMMs over positions and the output transform over output channels, each spread
//! over the pool.

use rayon::prelude::*;

use super::lanes::deinterleave2;
use super::matmul::MatRef;
use super::norm::Affine;
use super::packed::PackedLhs;

/// Transformed-tile positions: 4x4.
const XI: usize = 16;

/// Tiles a block aims for: V and M of a 512-channel block in about 8 MB each.
const BLOCK_TILES: usize = 256;

/// Whether a convolution is one this module computes: 3x3 kernel, stride 1, padding 1.
pub fn applies(kh: usize, kw: usize, stride: (usize, usize), padding: (usize, usize)) -> bool {
    kh == 3 && kw == 3 && stride == (1, 1) && padding == (1, 1)
}

/// Whether F(2x2) does fewer multiplies than direct convolution on an `h`×`w` map: 16 per tile against 9 per
/// output (a 1x1 map's single tile is mostly padding).
pub fn pays(h: usize, w: usize) -> bool {
    16 * h.div_ceil(2) * w.div_ceil(2) < 9 * h * w
}

/// U = G g Gᵀ for a `[o, c, 3, 3]` weight, as 16 planes `[O][C]` packed for `PackedLhs` (in bf16 when `bf16`),
/// laid out for products of about `cols` columns; in f32 on a CPU without the packed kernels, planes that
/// `gemm` multiplies; `None` for bf16 without AVX512-BF16.
pub fn pack_weights(wt: &[f32], o: usize, c: usize, bf16: bool, cols: usize) -> Option<Vec<PackedLhs>> {
    assert_eq!(wt.len(), o * c * 9, "a [o, c, 3, 3] weight");
    let mut u = vec![0.0f32; XI * o * c];
    for (pair, k) in wt.chunks(9).enumerate() {
        // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]: rows of g, then columns
        let g = |r: [f32; 3]| [r[0], 0.5 * (r[0] + r[1] + r[2]), 0.5 * (r[0] - r[1] + r[2]), r[2]];
        let rows: [[f32; 4]; 3] = std::array::from_fn(|i| g([k[3 * i], k[3 * i + 1], k[3 * i + 2]]));
        for x in 0..4 {
            let col = g([rows[0][x], rows[1][x], rows[2][x]]);
            for (y, v) in col.into_iter().enumerate() {
                u[(y * 4 + x) * o * c + pair] = v;
            }
        }
    }
    let pack = |plane| if bf16 { PackedLhs::bf16(plane, cols) } else { Some(PackedLhs::f32_or_plain(plane, cols)) };
    u.chunks(o * c).map(|plane| pack(MatRef::new(plane, o, c))).collect()
}

/// Tiles per image of an `h`×`w` map.
fn tiles(h: usize, w: usize) -> usize {
    h.div_ceil(2) * w.div_ceil(2)
}

/// Images per block for `[n, _, h, w]`.
fn block_images(n: usize, h: usize, w: usize) -> usize {
    (BLOCK_TILES / tiles(h, w).max(1)).clamp(1, n.max(1))
}

/// Columns of the products for input `[n, _, h, w]` (tiles per block), for `pack_weights`.
pub fn product_columns(n: usize, h: usize, w: usize) -> usize {
    block_images(n, h, w) * tiles(h, w)
}

/// y = conv2d(x, w) (3x3, stride 1, padding 1) for x `[n, c, h, w]` and the 16 packed planes of `pack_weights`,
/// with `affine` applied to each output plane as it is finished.
pub fn forward(
    x: &[f32],
    planes: &[PackedLhs],
    shape: (usize, usize, usize, usize, usize),
    affine: Option<&Affine>,
) -> Vec<f32> {
    let (n, c, h, w, o) = shape;
    assert!(planes.len() == XI && planes.iter().all(|u| u.rows() == o && u.depth() == c), "16 planes of O×C");
    assert_eq!(x.len(), n * c * h * w, "x is [n, c, h, w]");
    let (th, tw, hw) = (h.div_ceil(2), w.div_ceil(2), h * w);
    let mut y = vec![0.0f32; n * o * hw];
    if y.is_empty() {
        return y;
    }
    let per = block_images(n, h, w);
    for (b, yb) in y.chunks_mut(per * o * hw).enumerate() {
        let imgs = yb.len() / (o * hw);
        let t = imgs * th * tw;
        let xb = &x[b * per * c * hw..][..imgs * c * hw];
        // V[ξ][c][t]: each task one channel's 16 rows, one per position
        let mut v = vec![0.0f32; XI * c * t];
        let mut rows: Vec<Vec<&mut [f32]>> = (0..c).map(|_| Vec::with_capacity(XI)).collect();
        for plane in v.chunks_mut(c * t) {
            for (ci, row) in plane.chunks_mut(t).enumerate() {
                rows[ci].push(row);
            }
        }
        rows.into_par_iter().enumerate().for_each(|(ci, mut vrows)| {
            input_channel(xb, (imgs, c, h, w), ci, &mut vrows);
        });
        // M[ξ] = U[ξ] · V[ξ]
        let mut m = vec![0.0f32; XI * o * t];
        m.par_chunks_mut(o * t).zip(v.par_chunks(c * t)).enumerate().for_each(|(xi, (mx, vx))| {
            planes[xi].multiply(MatRef::new(vx, c, t), mx);
        });
        // Y = Aᵀ M A: each task one output channel, its plane in every image of the block
        let mut outs: Vec<Vec<&mut [f32]>> = (0..o).map(|_| Vec::with_capacity(imgs)).collect();
        for (p, plane) in yb.chunks_mut(hw).enumerate() {
            outs[p % o].push(plane);
        }
        let first = b * per;
        outs.into_par_iter().enumerate().for_each(|(oc, mut planes)| {
            output_channel(&m, (o, h, w, t), oc, &mut planes);
            if let Some(affine) = affine {
                for (img, yp) in planes.iter_mut().enumerate() {
                    affine.apply(oc, ((first + img) * o + oc) * hw, yp);
                }
            }
        });
    }
    y
}

/// V[ξ][ci][t] = (Bᵀ d B)[ξ] for every tile t of the block's images `xb` (`[imgs, c, h, w]`), into `vrows` (one
/// row of t per position). The 4x4 patches are gathered lane-major (d[i·4 + j][t]), from each padded input
/// row's even and odd columns, so both transform passes run over all the block's tiles at once.
fn input_channel(xb: &[f32], dims: (usize, usize, usize, usize), ci: usize, vrows: &mut [&mut [f32]]) {
    let (imgs, c, h, w) = dims;
    let (th, tw, hw) = (h.div_ceil(2), w.div_ceil(2), h * w);
    let t = imgs * th * tw;
    let mut d = vec![0.0f32; XI * t];
    // padded row: column q is input column q − 1, zero outside; tile tx reads columns 2tx..2tx + 4
    let mut padded = vec![0.0f32; 2 * tw + 2];
    let (mut even, mut odd) = (vec![0.0f32; tw + 1], vec![0.0f32; tw + 1]);
    for img in 0..imgs {
        let xp = &xb[(img * c + ci) * hw..][..hw];
        for ty in 0..th {
            let base = (img * th + ty) * tw;
            for i in 0..4 {
                padded.fill(0.0);
                if let Some(r) = (2 * ty + i).checked_sub(1).filter(|&r| r < h) {
                    padded[1..1 + w].copy_from_slice(&xp[r * w..][..w]);
                }
                deinterleave2(&padded, &mut even, &mut odd);
                // columns 2tx + j: j = 0, 1, 2, 3 are even[tx], odd[tx], even[tx + 1], odd[tx + 1]
                for (j, src) in [&even[..tw], &odd[..tw], &even[1..], &odd[1..]].into_iter().enumerate() {
                    d[(i * 4 + j) * t + base..][..tw].copy_from_slice(src);
                }
            }
        }
    }
    // Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]] along i, then along j
    let row = |k: usize| &d[k * t..(k + 1) * t];
    let mut e = vec![0.0f32; XI * t];
    for j in 0..4 {
        let (d0, d1, d2, d3) = (row(j), row(4 + j), row(8 + j), row(12 + j));
        for (k, ek) in e.chunks_mut(t).enumerate().skip(j).step_by(4) {
            let a = k / 4;
            for (l, v) in ek.iter_mut().enumerate() {
                *v = match a {
                    0 => d0[l] - d2[l],
                    1 => d1[l] + d2[l],
                    2 => d2[l] - d1[l],
                    _ => d1[l] - d3[l],
                };
            }
        }
    }
    for a in 0..4 {
        let e_row = |j: usize| &e[(a * 4 + j) * t..(a * 4 + j + 1) * t];
        let (e0, e1, e2, e3) = (e_row(0), e_row(1), e_row(2), e_row(3));
        for b in 0..4 {
            let dst = &mut vrows[a * 4 + b][..t];
            for (l, v) in dst.iter_mut().enumerate() {
                *v = match b {
                    0 => e0[l] - e2[l],
                    1 => e1[l] + e2[l],
                    2 => e2[l] - e1[l],
                    _ => e1[l] - e3[l],
                };
            }
        }
    }
}

/// Y = Aᵀ M A for output channel `oc` over the block's t tiles, into `planes` (that channel's plane in each
/// image), with Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]] along the columns, then the rows.
fn output_channel(m: &[f32], dims: (usize, usize, usize, usize), oc: usize, planes: &mut [&mut [f32]]) {
    let (o, h, w, t) = dims;
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let mrow = |xi: usize| &m[(xi * o + oc) * t..][..t];
    // s[r·2 + c'] = Σ_s Aᵀ[c'][s] M[r·4 + s]
    let mut s = vec![0.0f32; 8 * t];
    for r in 0..4 {
        let (m0, m1, m2, m3) = (mrow(r * 4), mrow(r * 4 + 1), mrow(r * 4 + 2), mrow(r * 4 + 3));
        let (s0, s1) = s[r * 2 * t..(r * 2 + 2) * t].split_at_mut(t);
        for l in 0..t {
            s0[l] = m0[l] + m1[l] + m2[l];
            s1[l] = m1[l] - m2[l] - m3[l];
        }
    }
    // q[r'·2 + c'] = Σ_r Aᵀ[r'][r] s[r·2 + c']
    let mut q = vec![0.0f32; 4 * t];
    for cc in 0..2 {
        let srow = |r: usize| &s[(r * 2 + cc) * t..][..t];
        let (s0, s1, s2, s3) = (srow(0), srow(1), srow(2), srow(3));
        let (q0, q1) = {
            let (lo, hi) = q.split_at_mut(2 * t);
            (&mut lo[cc * t..][..t], &mut hi[cc * t..][..t])
        };
        for l in 0..t {
            q0[l] = s0[l] + s1[l] + s2[l];
            q1[l] = s1[l] - s2[l] - s3[l];
        }
    }
    for (img, yp) in planes.iter_mut().enumerate() {
        for ty in 0..th {
            for r in 0..2 {
                let yy = 2 * ty + r;
                if yy >= h {
                    continue;
                }
                let out = &mut yp[yy * w..][..w];
                let base = (img * th + ty) * tw;
                let (q0, q1) = (&q[(r * 2) * t + base..][..tw], &q[(r * 2 + 1) * t + base..][..tw]);
                for (xx, v) in out.iter_mut().enumerate() {
                    *v = if xx % 2 == 0 { q0[xx / 2] } else { q1[xx / 2] };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::test_util::{rel, values};
    use crate::engine::cpu::{ConvAlgo, Operands, conv2d_with, packed};
    use crate::engine::{ConvGeom, EvalAffine, Tensor};

    /// Against im2col: odd and even sizes, one and several blocks of images, f32 and bf16, and the affine map
    /// (with a residual and the ReLU) applied as in `Backend::conv2d_affine_act`.
    #[test]
    fn matches_im2col() {
        for &(n, c, h, w, o) in
            &[(1, 3, 1, 1, 2), (2, 5, 7, 7, 16), (3, 16, 6, 9, 8), (40, 4, 5, 5, 3), (1, 64, 14, 13, 64)]
        {
            let x = Tensor::new(&[n, c, h, w], values(n * c * h * w, 1)).unwrap();
            let wt = Tensor::new(&[o, c, 3, 3], values(o * c * 9, 2)).unwrap();
            let want = conv2d_with(&x, &wt, ConvGeom::square(1, 1), ConvAlgo::Im2col, Operands::F32);
            let cols = product_columns(n, h, w);
            let planes = pack_weights(wt.data(), o, c, false, cols).unwrap();
            let got = forward(x.data(), &planes, (n, c, h, w, o), None);
            let e = rel(&got, want.data());
            assert!(e < 1e-6, "{:?}: {e:.2e}", (n, c, h, w, o));
            let (scale, shift) = (values(o, 3), values(o, 4));
            let residual = Tensor::new(&[n, o, h, w], values(n * o * h * w, 5)).unwrap();
            let affine = EvalAffine { scale: &scale, shift: &shift, residual: Some(&residual), relu: true };
            let fused = forward(x.data(), &planes, (n, c, h, w, o), Some(&Affine::new(affine, [n, o, h, w])));
            let want_fused: Vec<f32> = want
                .data()
                .iter()
                .enumerate()
                .map(|(i, &v)| (v * scale[i / (h * w) % o] + shift[i / (h * w) % o] + residual.data()[i]).max(0.0))
                .collect();
            // absolute: the ReLU may zero every output of a tiny case
            let worst = fused.iter().zip(&want_fused).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let size = want_fused.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            assert!(worst < 1e-6 * size, "{:?} with the affine map: off by {worst} at size {size}", (n, c, h, w, o));
            if packed::bf16_supported() {
                let planes = pack_weights(wt.data(), o, c, true, cols).unwrap();
                let e = rel(&forward(x.data(), &planes, (n, c, h, w, o), None), want.data());
                assert!(e < 2e-2, "{:?} bf16: {e:.2e}", (n, c, h, w, o));
            }
        }
    }
}
