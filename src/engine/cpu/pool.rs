//! Max pooling (with −∞ padding, as PyTorch) and global average pooling.

use rayon::prelude::*;

use crate::engine::Tensor;

pub fn max_forward(x: &Tensor, k: usize, s: usize, p: usize) -> (Tensor, Vec<u32>) {
    let [n, c, h, w] = x.dims4();
    assert!(h + 2 * p >= k && w + 2 * p >= k && s > 0, "max pool: window larger than padded input");
    let oh = (h + 2 * p - k) / s + 1;
    let ow = (w + 2 * p - k) / s + 1;
    let mut y = vec![0.0f32; n * c * oh * ow];
    let mut idx = vec![0u32; y.len()];
    if oh * ow > 0 && h * w > 0 {
        y.par_chunks_mut(oh * ow).zip(idx.par_chunks_mut(oh * ow)).zip(x.data().par_chunks(h * w)).for_each(
            |((yp, ip), xp)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (mut best, mut at) = (f32::NEG_INFINITY, 0usize);
                        let y0 = (oy * s) as isize - p as isize;
                        let x0 = (ox * s) as isize - p as isize;
                        let mut first = true;
                        for iy in y0.max(0)..(y0 + k as isize).min(h as isize) {
                            for ix in x0.max(0)..(x0 + k as isize).min(w as isize) {
                                let i = iy as usize * w + ix as usize;
                                // PyTorch keeps the first maximum in scan order and lets NaN win.
                                if first || xp[i] > best || xp[i].is_nan() {
                                    best = xp[i];
                                    at = i;
                                    first = false;
                                }
                            }
                        }
                        yp[oy * ow + ox] = best;
                        ip[oy * ow + ox] = at as u32;
                    }
                }
            },
        );
    }
    (Tensor::new(&[n, c, oh, ow], y).expect("pool output shape"), idx)
}

/// max(best, v) where NaN wins, as PyTorch's max pool; a select, so the passes below vectorise.
#[inline(always)]
fn nan_max(best: f32, v: f32) -> f32 {
    if v > best || v.is_nan() { v } else { best }
}

/// The same values as `max_forward` without the winners' indices (inference): the window's max taken along the
/// rows, then down the columns, so each output costs 2k compares of whole vectors instead of k² branchy scalar
/// steps (the ImageNet stem's pool: 1.5 ms of a 35 ms batch-1 forward before).
pub fn max_values(x: &Tensor, k: usize, s: usize, p: usize) -> Tensor {
    let [n, c, h, w] = x.dims4();
    assert!(h + 2 * p >= k && w + 2 * p >= k && s > 0, "max pool: window larger than padded input");
    let oh = (h + 2 * p - k) / s + 1;
    let ow = (w + 2 * p - k) / s + 1;
    let mut y = vec![0.0f32; n * c * oh * ow];
    if oh * ow > 0 && h * w > 0 {
        y.par_chunks_mut(oh * ow).zip(x.data().par_chunks(h * w)).for_each(|(yp, xp)| {
            // rows[iy][ox]: the max over the window's columns in input row iy (−∞ where none is inside)
            let mut rows = vec![f32::NEG_INFINITY; h * ow];
            // stride 2 (the stem's pool): each row split once into even and odd columns, so each window column
            // is a contiguous run instead of every other value
            let (mut even, mut odd) = (vec![0.0f32; w.div_ceil(2)], vec![0.0f32; w.div_ceil(2)]);
            for (r, xr) in rows.chunks_mut(ow).zip(xp.chunks(w)) {
                if s == 2 {
                    super::lanes::deinterleave2(xr, &mut even, &mut odd);
                }
                for j in 0..k {
                    // output columns whose window column j lies inside the row: 0 ≤ ox·s + j − p < w
                    let lo = p.saturating_sub(j).div_ceil(s).min(ow);
                    let hi = if w + p > j { (w + p - j).div_ceil(s).clamp(lo, ow) } else { lo };
                    if lo == hi {
                        continue;
                    }
                    let first = lo * s + j - p;
                    if s == 2 {
                        let phase = if first.is_multiple_of(2) { &even } else { &odd };
                        for (v, &x) in r[lo..hi].iter_mut().zip(&phase[first / 2..]) {
                            *v = nan_max(*v, x);
                        }
                    } else {
                        for (v, &x) in r[lo..hi].iter_mut().zip(xr[first..].iter().step_by(s)) {
                            *v = nan_max(*v, x);
                        }
                    }
                }
            }
            yp.fill(f32::NEG_INFINITY);
            for (oy, out) in yp.chunks_mut(ow).enumerate() {
                for i in 0..k {
                    let Some(iy) = (oy * s + i).checked_sub(p).filter(|&iy| iy < h) else { continue };
                    for (v, &r) in out.iter_mut().zip(&rows[iy * ow..(iy + 1) * ow]) {
                        *v = nan_max(*v, r);
                    }
                }
            }
        });
    }
    Tensor::new(&[n, c, oh, ow], y).expect("pool output shape")
}

pub fn max_backward(dy: &Tensor, argmax: &[u32], x_shape: [usize; 4]) -> Tensor {
    let [_, _, oh, ow] = dy.dims4();
    let [n, c, h, w] = x_shape;
    assert_eq!(argmax.len(), dy.numel(), "max pool backward: indices do not match dy");
    let mut dx = vec![0.0f32; n * c * h * w];
    if h * w > 0 && oh * ow > 0 {
        dx.par_chunks_mut(h * w).zip(dy.data().par_chunks(oh * ow)).zip(argmax.par_chunks(oh * ow)).for_each(
            |((dxp, dyp), ip)| {
                for (&g, &i) in dyp.iter().zip(ip) {
                    dxp[i as usize] += g;
                }
            },
        );
    }
    Tensor::new(&x_shape, dx).expect("dx has x's shape")
}

pub fn avg_forward(x: &Tensor) -> Tensor {
    let [n, c, h, w] = x.dims4();
    let hw = (h * w).max(1);
    let y: Vec<f32> =
        x.data().chunks(hw).map(|p| (p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32).collect();
    Tensor::new(&[n, c], y).expect("avg pool output shape")
}

pub fn avg_backward(dy: &Tensor, x_shape: [usize; 4]) -> Tensor {
    let [n, c, h, w] = x_shape;
    assert_eq!(dy.shape(), [n, c], "avg pool backward: dy has the wrong shape");
    let hw = h * w;
    let mut dx = vec![0.0f32; n * c * hw];
    if hw > 0 {
        for (plane, &g) in dx.chunks_mut(hw).zip(dy.data()) {
            plane.fill(g / hw as f32);
        }
    }
    Tensor::new(&x_shape, dx).expect("dx has x's shape")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The separable inference pool gives the indexed pool's values bit for bit: odd and even sizes, windows
    /// wider than the padding, a NaN (which wins) and −∞ inputs.
    #[test]
    fn values_match_the_indexed_pool() {
        for &(h, w, k, s, p) in
            &[(112, 112, 3, 2, 1), (7, 9, 3, 2, 1), (5, 5, 2, 2, 0), (6, 4, 3, 1, 1), (3, 3, 3, 3, 1), (1, 1, 1, 1, 0)]
        {
            let mut v: Vec<f32> = (0..2 * 3 * h * w).map(|i| ((i * 7919 % 1013) as f32 / 500.0) - 1.0).collect();
            v[h * w / 2] = f32::NAN;
            v[h * w + 1] = f32::NEG_INFINITY;
            let x = Tensor::new(&[2, 3, h, w], v).unwrap();
            let (want, _) = max_forward(&x, k, s, p);
            let got = max_values(&x, k, s, p);
            assert_eq!(got.shape(), want.shape());
            for (g, e) in got.data().iter().zip(want.data()) {
                assert!(g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()), "{h}x{w} k{k} s{s} p{p}: {g} vs {e}");
            }
        }
    }
}
