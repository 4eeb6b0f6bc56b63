//! A safe, bounds-checked front to the `gemm` crate's f32 matrix multiply.

use gemm::Parallelism;

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

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matrix view reaches past its slice");
        }
    }
}

/// dst (row-major `a.rows`×`b.cols`) = a·b, or dst += a·b when `accumulate`.
/// `threads` > 1 lets gemm split the product across the rayon pool.
pub fn matmul(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool, threads: usize) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(dst.len(), m * n, "destination has the wrong size");
    a.check();
    b.check();
    if m == 0 || n == 0 {
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
