//! Convolutions on maps smaller than the kernel's reach: the taps that only ever read padding dropped.
//!
//! A tap (ky, kx) of a kh×kw kernel is live when some output position puts it on a real input pixel. On a 1x1
//! map under a 3x3 convolution with padding 1 only the centre tap is; from a 2x2 map with stride 2, four. The
//! dead ones multiply zeros, yet im2col writes them and the GEMM streams their weights: on the bundled 8x8
//! digits ResNet-34's layer4 runs on 1x1 maps, so 8/9 of its multiplies and of its 9.4 MB weight reads per
//! convolution and pass are padding. The live taps form a rectangle, and the convolution equals the one with
//! the kernel cropped to it and the padding reduced by the rows and columns dropped on the top and left
//! (checked: same output size, else nothing is cropped); the weight gradient of a dead tap is zero.

use crate::engine::{ConvGeom, Tensor};

/// The first and last live tap along one dimension: kernel `k`, padding `p`, stride `s`, `input` pixels and
/// `out` output positions.
fn live(k: usize, p: usize, s: usize, input: usize, out: usize) -> (usize, usize) {
    let reaches = |t: usize| (0..out).any(|o| (o * s + t).checked_sub(p).is_some_and(|i| i < input));
    let first = (0..k).find(|&t| reaches(t)).unwrap_or(0);
    let last = (0..k).rev().find(|&t| reaches(t)).unwrap_or(k.saturating_sub(1));
    (first, last.max(first))
}

/// The live rectangle of a convolution: first rows/columns and the cropped kernel's size and geometry.
pub struct Window {
    y0: usize,
    x0: usize,
    kh: usize,
    kw: usize,
    pub geom: ConvGeom,
}

/// The window of `w` (`[O, C, kh, kw]`) over input `[n, c, h, wd]`, when it is smaller than the kernel.
pub fn window(x: [usize; 4], w: [usize; 4], geom: ConvGeom) -> Option<Window> {
    let [_, _, h, wd] = x;
    let [_, _, kh, kw] = w;
    let (oh, ow) = geom.output_hw(h, wd, kh, kw);
    let (y0, y1) = live(kh, geom.padding.0, geom.stride.0, h, oh);
    let (x0, x1) = live(kw, geom.padding.1, geom.stride.1, wd, ow);
    let (ch, cw) = (y1 - y0 + 1, x1 - x0 + 1);
    if (ch, cw) == (kh, kw) {
        return None;
    }
    let padding = (geom.padding.0.checked_sub(y0)?, geom.padding.1.checked_sub(x0)?);
    let cropped = ConvGeom { stride: geom.stride, padding };
    (h + 2 * padding.0 >= ch && wd + 2 * padding.1 >= cw && cropped.output_hw(h, wd, ch, cw) == (oh, ow))
        .then_some(Window { y0, x0, kh: ch, kw: cw, geom: cropped })
}

impl Window {
    /// The weight cropped to the window.
    pub fn crop(&self, w: &Tensor) -> Tensor {
        let [o, c, kh, kw] = w.dims4();
        // Element by element: the kept rows are 1-3 values, too short for a copy call each.
        let taps: Vec<usize> =
            (0..self.kh).flat_map(|y| (0..self.kw).map(move |x| (self.y0 + y) * kw + self.x0 + x)).collect();
        let out: Vec<f32> = w.data().chunks(kh * kw).flat_map(|plane| taps.iter().map(|&t| plane[t])).collect();
        debug_assert_eq!(out.len(), o * c * self.kh * self.kw);
        Tensor::new(&[o, c, self.kh, self.kw], out).expect("the cropped weight's shape")
    }

    /// A gradient of the cropped weight as one of the whole weight (`shape`): zero at the dead taps.
    pub fn uncrop(&self, dw: &Tensor, shape: [usize; 4]) -> Tensor {
        let [o, c, kh, kw] = shape;
        let mut out = vec![0.0f32; o * c * kh * kw];
        let taps: Vec<usize> =
            (0..self.kh).flat_map(|y| (0..self.kw).map(move |x| (self.y0 + y) * kw + self.x0 + x)).collect();
        for (plane, small) in out.chunks_mut(kh * kw).zip(dw.data().chunks(taps.len())) {
            taps.iter().zip(small).for_each(|(&t, &v)| plane[t] = v);
        }
        Tensor::new(&shape, out).expect("the weight's shape")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::conv::{backward_with, forward_with};
    use crate::engine::cpu::test_util::{rel, values};
    use crate::engine::cpu::{ConvAlgo, Operands};

    #[test]
    fn windows_of_resnet_small_maps() {
        let win = |h: usize, s: usize| window([2, 4, h, h], [8, 4, 3, 3], ConvGeom::square(s, 1));
        let w = win(1, 1).expect("a 1x1 map keeps the centre tap");
        assert_eq!((w.y0, w.x0, w.kh, w.kw, w.geom), (1, 1, 1, 1, ConvGeom::square(1, 0)));
        let w = win(2, 2).expect("2x2 → 1x1 with stride 2 keeps four taps");
        assert_eq!((w.y0, w.kh, w.geom), (1, 2, ConvGeom::square(2, 0)));
        assert!(win(2, 1).is_none() && win(4, 2).is_none() && win(7, 1).is_none(), "every tap is live");
    }

    /// Direct convolution (every tap, padding read as zeros) and its two gradients: the reference.
    fn direct(x: &Tensor, w: &Tensor, dy: &[f32], geom: ConvGeom) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let ([n, c, h, wd], [o, _, kh, kw]) = (x.dims4(), w.dims4());
        let (oh, ow) = geom.output_hw(h, wd, kh, kw);
        let (mut y, mut dx, mut dw) = (vec![0.0; n * o * oh * ow], vec![0.0; x.numel()], vec![0.0; w.numel()]);
        let (xs, ws) = (x.data(), w.data());
        for (b, oc, oy, ox, ci, ky, kx) in positions(n, o, oh, ow, c, kh, kw) {
            let (iy, ix) = (
                (oy * geom.stride.0 + ky).checked_sub(geom.padding.0),
                (ox * geom.stride.1 + kx).checked_sub(geom.padding.1),
            );
            let (Some(iy), Some(ix)) = (iy, ix) else { continue };
            if iy >= h || ix >= wd {
                continue;
            }
            let (xi, wi, yi) = (
                ((b * c + ci) * h + iy) * wd + ix,
                ((oc * c + ci) * kh + ky) * kw + kx,
                ((b * o + oc) * oh + oy) * ow + ox,
            );
            y[yi] += xs[xi] * ws[wi];
            dx[xi] += dy[yi] * ws[wi];
            dw[wi] += dy[yi] * xs[xi];
        }
        (y, dx, dw)
    }

    /// Every index tuple of the direct convolution's seven loops.
    #[allow(clippy::too_many_arguments)]
    fn positions(
        n: usize,
        o: usize,
        oh: usize,
        ow: usize,
        c: usize,
        kh: usize,
        kw: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize, usize, usize, usize)> {
        (0..n).flat_map(move |b| {
            (0..o).flat_map(move |oc| {
                (0..oh).flat_map(move |oy| {
                    (0..ow).flat_map(move |ox| {
                        (0..c).flat_map(move |ci| {
                            (0..kh).flat_map(move |ky| (0..kw).map(move |kx| (b, oc, oy, ox, ci, ky, kx)))
                        })
                    })
                })
            })
        })
    }

    /// The convolution entry points (which crop) against the direct convolution with the whole kernel: outputs
    /// and both gradients, on maps where taps are dead and where none is.
    #[test]
    fn cropped_convolutions_equal_the_whole_kernels() {
        for (h, s) in [(1, 1), (2, 2), (1, 2), (3, 3), (4, 1)] {
            let (x, w) = ([3, 5, h, h + 1], [6, 5, 3, 3]);
            let xt = Tensor::new(&x, values(x.iter().product(), 1)).unwrap();
            let wt = Tensor::new(&w, values(w.iter().product(), 2)).unwrap();
            let geom = ConvGeom::square(s, 1);
            let got = forward_with(&xt, &wt, geom, ConvAlgo::Im2col, Operands::F32);
            let dy = values(got.numel(), 3);
            let (y, dx, dw) = direct(&xt, &wt, &dy, geom);
            assert!(rel(got.data(), &y) < 1e-6, "forward {h}x{} stride {s}", h + 1);
            let dyt = Tensor::new(got.shape(), dy).unwrap();
            let (gdx, gdw) = backward_with(&xt, &wt, &dyt, geom, (true, true), ConvAlgo::Im2col, Operands::F32);
            assert!(rel(gdx.unwrap().data(), &dx) < 1e-6, "dx {h} stride {s}");
            assert!(rel(gdw.unwrap().data(), &dw) < 1e-6, "dw {h} stride {s}");
        }
    }
}
