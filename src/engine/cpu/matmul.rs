//! A safe, bounds-checked front to the `gemm` crate's f32 matrix multiply.

use gemm::Parallelism;
use rayon::prelude::*;

/// A read-only strided matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
/// Transposing a row-major matrix is swapping the strides.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows`×`cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Rows [r0, r1) of this matrix.
    fn rows(self, r0: usize, r1: usize) -> Self {
        let data = if r0 < r1 { &self.data[r0 * self.row_stride..] } else { &self.data[..0] };
        MatRef { data, rows: r1 - r0, ..self }
    }

    /// Element (i, j).
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    /// Panics unless every element lies inside `data`.
    pub fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matrix view reaches past its slice");
        }
    }
}

/// Rows of `a` below which a product is not split across threads by rows.
const SPLIT_MIN_ROWS: usize = 64;

/// dst (row-major `a.rows`×`b.cols`) = a·b, or dst += a·b when `accumulate`.
/// `threads` > 1 spreads the product over the rayon pool: by bands of `a`'s rows, one single-threaded gemm each,
/// where `a` has enough rows (measured on 2 threads: 512x4608 · 4608x392 at 197 GFLOP/s this way, 164 with
/// gemm's own split; 4608x49 columns 170 against 142), else by gemm's own split.
pub fn matmul(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool, threads: usize) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(dst.len(), m * n, "destination has the wrong size");
    a.check();
    b.check();
    if m == 0 || n == 0 {
        return;
    }
    // Only for row-major `a` and `b` (convolution forward): with a transposed operand (the gradients) the bands
    // ran slower than gemm's own split.
    if threads > 1 && m >= SPLIT_MIN_ROWS * threads && a.col_stride == 1 && b.col_stride == 1 {
        // bands of whole 16-row register blocks, so each band keeps gemm's full-width microkernel
        let band = m.div_ceil(threads).next_multiple_of(16);
        dst.par_chunks_mut(band * n).enumerate().for_each(|(i, d)| {
            let r0 = i * band;
            matmul(d, a.rows(r0, (r0 + band).min(m)), b, accumulate, 1);
        });
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the asserts above prove that every element gemm addresses — (m-1, n-1) of dst with strides (n, 1),
    // and the extreme corners of `a` and `b` through their strides — lies inside the borrowed slices; `dst` is
    // borrowed mutably, so it cannot alias `a` or `b`. Strides fit in isize because they index existing slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row-band split (more rows than `SPLIT_MIN_ROWS` per thread, a ragged last band) against the f64
    /// product, with and without accumulation.
    #[test]
    fn banded_product_matches_f64() {
        let (m, k, n) = (2 * SPLIT_MIN_ROWS + 37, 70, 45);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729 % 1000) as f32 / 500.0) - 1.0).collect();
        let want: Vec<f64> =
            (0..m * n).map(|ij| (0..k).map(|p| a[ij / n * k + p] as f64 * b[p * n + ij % n] as f64).sum()).collect();
        for threads in [1, 2, 3] {
            let mut dst = vec![1.0f32; m * n];
            matmul(&mut dst, MatRef::new(&a, m, k), MatRef::new(&b, k, n), true, threads);
            let worst = dst.iter().zip(&want).map(|(&d, &w)| (d as f64 - 1.0 - w).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-4, "{threads} threads: accumulated product off by {worst}");
            matmul(&mut dst, MatRef::new(&a, m, k), MatRef::new(&b, k, n), false, threads);
            let worst = dst.iter().zip(&want).map(|(&d, &w)| (d as f64 - w).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-4, "{threads} threads: product off by {worst}");
        }
    }
}
