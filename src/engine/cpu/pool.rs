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
    let y: Vec<f32> = x.data().chunks(hw).map(|p| (p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32).collect();
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
