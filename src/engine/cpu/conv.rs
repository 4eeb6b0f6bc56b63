//! 2-d convolution as im2col + GEMM, one image at a time.
//!
//! For image n: col = im2col(x[n]) is `[C·kh·kw, OH·OW]`, and y[n] = W·col with W viewed as `[O, C·kh·kw]` (the
//! PyTorch weight layout flattened). Backward reuses the same matrices: dW += dy[n]·colᵀ and dcol = Wᵀ·dy[n],
//! scattered back by col2im. A 1x1 stride-1 unpadded convolution skips im2col: x[n] already is `[C, H·W]`.
//! Work is split across images when the batch can feed every thread, otherwise inside each GEMM.

use rayon::prelude::*;

use super::matmul::{MatRef, matmul};
use crate::engine::{ConvGeom, Tensor};

struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    geom: ConvGeom,
}

impl Dims {
    fn new(x: &Tensor, w: &Tensor, geom: ConvGeom) -> Dims {
        let [n, c, h, wi] = x.dims4();
        let [o, wc, kh, kw] = w.dims4();
        assert_eq!(c, wc, "conv2d: input has {c} channels, weight expects {wc}");
        assert!(
            h + 2 * geom.padding.0 >= kh && wi + 2 * geom.padding.1 >= kw,
            "conv2d: kernel larger than padded input"
        );
        let (oh, ow) = geom.output_hw(h, wi, kh, kw);
        Dims { n, c, h, w: wi, o, kh, kw, oh, ow, geom }
    }
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.geom.stride == (1, 1) && self.geom.padding == (0, 0)
    }
    fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn ohw(&self) -> usize {
        self.oh * self.ow
    }
    fn chw(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Images handled per task, and the threads each GEMM may use.
    fn split(&self) -> (usize, usize) {
        let threads = rayon::current_num_threads().max(1);
        if self.n >= threads {
            (self.n.div_ceil(threads), 1)
        } else {
            (self.n.max(1), threads)
        }
    }
}

/// Row (ci, i, j) of col holds x[ci, oh·sh + i − ph, ow·sw + j − pw] for every output position, 0 in the padding.
fn im2col(x: &[f32], d: &Dims, col: &mut [f32]) {
    let (sh, sw) = d.geom.stride;
    let (ph, pw) = d.geom.padding;
    let ohw = d.ohw();
    for ci in 0..d.c {
        let plane = &x[ci * d.h * d.w..(ci + 1) * d.h * d.w];
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &mut col[((ci * d.kh + i) * d.kw + j) * ohw..][..ohw];
                for oy in 0..d.oh {
                    let out = &mut row[oy * d.ow..(oy + 1) * d.ow];
                    let iy = (oy * sh + i) as isize - ph as isize;
                    if iy < 0 || iy >= d.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * d.w..(iy as usize + 1) * d.w];
                    for (ox, v) in out.iter_mut().enumerate() {
                        let ix = (ox * sw + j) as isize - pw as isize;
                        *v = if ix >= 0 && ix < d.w as isize { src[ix as usize] } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// The adjoint of im2col: add every col entry back onto the input position it was read from.
fn col2im(col: &[f32], d: &Dims, dx: &mut [f32]) {
    let (sh, sw) = d.geom.stride;
    let (ph, pw) = d.geom.padding;
    let ohw = d.ohw();
    for ci in 0..d.c {
        let plane = &mut dx[ci * d.h * d.w..(ci + 1) * d.h * d.w];
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &col[((ci * d.kh + i) * d.kw + j) * ohw..][..ohw];
                for oy in 0..d.oh {
                    let iy = (oy * sh + i) as isize - ph as isize;
                    if iy < 0 || iy >= d.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * d.w..(iy as usize + 1) * d.w];
                    for (ox, v) in row[oy * d.ow..(oy + 1) * d.ow].iter().enumerate() {
                        let ix = (ox * sw + j) as isize - pw as isize;
                        if ix >= 0 && ix < d.w as isize {
                            dst[ix as usize] += v;
                        }
                    }
                }
            }
        }
    }
}

pub fn forward(x: &Tensor, w: &Tensor, geom: ConvGeom) -> Tensor {
    let d = Dims::new(x, w, geom);
    let (per_task, gemm_threads) = d.split();
    let (ckk, ohw, chw) = (d.ckk(), d.ohw(), d.chw());
    let wm = MatRef::new(w.data(), d.o, ckk);
    let mut y = vec![0.0f32; d.n * d.o * ohw];
    if d.n > 0 && ohw > 0 {
        y.par_chunks_mut(per_task * d.o * ohw).zip(x.data().par_chunks(per_task * chw)).for_each(|(ys, xs)| {
            let mut col = if d.pointwise() { Vec::new() } else { vec![0.0f32; ckk * ohw] };
            for (y_n, x_n) in ys.chunks_mut(d.o * ohw).zip(xs.chunks(chw)) {
                let cols = if d.pointwise() {
                    x_n
                } else {
                    im2col(x_n, &d, &mut col);
                    &col
                };
                matmul(y_n, wm, MatRef::new(cols, ckk, ohw), false, gemm_threads);
            }
        });
    }
    Tensor::new(&[d.n, d.o, d.oh, d.ow], y).expect("conv2d output shape matches its data")
}

pub fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    geom: ConvGeom,
    need_dx: bool,
    need_dw: bool,
) -> (Option<Tensor>, Option<Tensor>) {
    let d = Dims::new(x, w, geom);
    assert_eq!(dy.shape(), [d.n, d.o, d.oh, d.ow], "conv2d backward: dy has the wrong shape");
    let (per_task, gemm_threads) = d.split();
    let (ckk, ohw, chw) = (d.ckk(), d.ohw(), d.chw());
    let wm = MatRef::new(w.data(), d.o, ckk);
    let mut dx = vec![0.0f32; if need_dx { d.n * chw } else { 0 }];
    let tasks = d.n.div_ceil(per_task.max(1));
    let mut dx_parts: Vec<&mut [f32]> = if need_dx { dx.chunks_mut(per_task * chw).collect() } else { Vec::new() };
    dx_parts.resize_with(tasks, || &mut []);

    let partial_dws: Vec<Vec<f32>> = dx_parts
        .into_par_iter()
        .enumerate()
        .map(|(t, dx_part)| {
            let first = t * per_task;
            let last = ((t + 1) * per_task).min(d.n);
            let mut dw = vec![0.0f32; if need_dw { d.o * ckk } else { 0 }];
            let mut col = if d.pointwise() { Vec::new() } else { vec![0.0f32; ckk * ohw] };
            for img in first..last {
                let x_n = &x.data()[img * chw..(img + 1) * chw];
                let dy_n = MatRef::new(&dy.data()[img * d.o * ohw..(img + 1) * d.o * ohw], d.o, ohw);
                if need_dw {
                    let cols = if d.pointwise() {
                        x_n
                    } else {
                        im2col(x_n, &d, &mut col);
                        &col
                    };
                    matmul(&mut dw, dy_n, MatRef::new(cols, ckk, ohw).t(), true, gemm_threads);
                }
                if need_dx {
                    let dx_n = &mut dx_part[(img - first) * chw..(img - first + 1) * chw];
                    if d.pointwise() {
                        matmul(dx_n, wm.t(), dy_n, false, gemm_threads);
                    } else {
                        matmul(&mut col, wm.t(), dy_n, false, gemm_threads);
                        col2im(&col, &d, dx_n);
                    }
                }
            }
            dw
        })
        .collect();

    let dx = need_dx.then(|| Tensor::new(x.shape(), dx).expect("dx has x's shape"));
    let dw = need_dw.then(|| {
        let mut total = vec![0.0f32; d.o * ckk];
        for part in &partial_dws {
            total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
        }
        Tensor::new(w.shape(), total).expect("dw has w's shape")
    });
    (dx, dw)
}
