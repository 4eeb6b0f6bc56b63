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
/// laid out for products of about `cols` columns; `None` where this CPU lacks the packed kernels.
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
    let pack = if bf16 { PackedLhs::bf16 } else { PackedLhs::f32 };
    u.chunks(o * c).map(|plane| pack(MatRef::new(plane, o, c), cols)).collect()
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
pub fn forward(x: &[f32], planes: &[PackedLhs], shape: (usize, usize, usize, usize, usize), affine: Option<&Affine>) -> Vec<f32> {
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
            for img in 0..imgs {
                let xp = &xb[(img * c + ci) * hw..][..hw];
                let at = |r: isize, q: isize| {
                    if r < 0 || q < 0 || r as usize >= h || q as usize >= w { 0.0 } else { xp[r as usize * w + q as usize] }
                };
                for ty in 0..th {
                    for tx in 0..tw {
                        let (r0, q0) = (2 * ty as isize - 1, 2 * tx as isize - 1);
                        let d: [[f32; 4]; 4] = std::array::from_fn(|i| std::array::from_fn(|j| at(r0 + i as isize, q0 + j as isize)));
                        // Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]], on the rows then the columns
                        let bt = |z: [f32; 4]| [z[0] - z[2], z[1] + z[2], z[2] - z[1], z[1] - z[3]];
                        let e: [[f32; 4]; 4] = {
                            let cols: [[f32; 4]; 4] = std::array::from_fn(|j| bt([d[0][j], d[1][j], d[2][j], d[3][j]]));
                            std::array::from_fn(|a| bt([cols[0][a], cols[1][a], cols[2][a], cols[3][a]]))
                        };
                        let ti = (img * th + ty) * tw + tx;
                        // e[a][b] = (Bᵀ d B)[a][b], position a·4 + b as in U
                        for (a, ea) in e.iter().enumerate() {
                            for (b, &val) in ea.iter().enumerate() {
                                vrows[a * 4 + b][ti] = val;
                            }
                        }
                    }
                }
            }
        });
        // M[ξ] = U[ξ] · V[ξ]
        let mut m = vec![0.0f32; XI * o * t];
        m.par_chunks_mut(o * t).zip(v.par_chunks(c * t)).enumerate().for_each(|(xi, (mx, vx))| {
            planes[xi].multiply(MatRef::new(vx, c, t), mx);
        });
        // Y = Aᵀ M A per output plane, Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]
        let first = b * per;
        yb.par_chunks_mut(hw).enumerate().for_each(|(p, yp)| {
            let (img, oc) = (p / o, p % o);
            for ty in 0..th {
                for tx in 0..tw {
                    let ti = (img * th + ty) * tw + tx;
                    let mv: [[f32; 4]; 4] = std::array::from_fn(|r| std::array::from_fn(|s| m[((r * 4 + s) * o + oc) * t + ti]));
                    let at = |z: [f32; 4]| [z[0] + z[1] + z[2], z[1] - z[2] - z[3]];
                    let cols: [[f32; 2]; 4] = std::array::from_fn(|s| at([mv[0][s], mv[1][s], mv[2][s], mv[3][s]]));
                    for r in 0..2 {
                        let out = at([cols[0][r], cols[1][r], cols[2][r], cols[3][r]]);
                        let yy = 2 * ty + r;
                        if yy >= h {
                            continue;
                        }
                        for (s, &val) in out.iter().enumerate() {
                            let xx = 2 * tx + s;
                            if xx < w {
                                yp[yy * w + xx] = val;
                            }
                        }
                    }
                }
            }
            if let Some(affine) = affine {
                affine.apply(oc, ((first + img) * o + oc) * hw, yp);
            }
        });
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::test_util::{rel, values};
    use crate::engine::cpu::{ConvAlgo, conv2d_with, packed};
    use crate::engine::{ConvGeom, EvalAffine, Tensor};

    /// Against im2col: odd and even sizes, one and several blocks of images, f32 and bf16, and the affine map
    /// (with a residual and the ReLU) applied as in `Backend::conv2d_affine_act`.
    #[test]
    fn matches_im2col() {
        if !packed::f32_supported() {
            return;
        }
        for &(n, c, h, w, o) in &[(1, 3, 1, 1, 2), (2, 5, 7, 7, 16), (3, 16, 6, 9, 8), (40, 4, 5, 5, 3), (1, 64, 14, 13, 64)] {
            let x = Tensor::new(&[n, c, h, w], values(n * c * h * w, 1)).unwrap();
            let wt = Tensor::new(&[o, c, 3, 3], values(o * c * 9, 2)).unwrap();
            let want = conv2d_with(&x, &wt, ConvGeom::square(1, 1), ConvAlgo::Im2col);
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
