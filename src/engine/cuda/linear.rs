//! The fully connected head through cuBLAS, y = x·wᵀ + b with row-major x `[N, in]`, w `[out, in]`, y `[N, out]`.
//!
//! cuBLAS is column-major, and a row-major matrix is its transpose seen column-major. So yᵀ (`[out, N]`
//! column-major, which is y row-major) = op(w)·xᵀ with w seen column-major as `[in, out]` (lda = in) and
//! transposed, and x seen column-major as `[in, N]` (ldb = in) untransposed: sgemm(T, N, m = out, n = N, k = in).

use std::ffi::c_int;

use cudarc::cublas::{result as blas, sys};

use super::device::{Buf, Device, cuda_err};
use super::kernels::Kernels;
use crate::error::{Error, Result};

#[allow(clippy::too_many_arguments)]
pub fn forward(
    dev: &Device,
    kernels: &Kernels,
    x: &Buf<f32>,
    w: &Buf<f32>,
    b: &Buf<f32>,
    y: &Buf<f32>,
    rows: usize,
    fin: usize,
    fout: usize,
) -> Result<()> {
    if x.len < rows * fin || w.len < fout * fin || y.len < rows * fout {
        return Err(Error::invalid("CUDA: buffers too small for the linear layer"));
    }
    let int = |v: usize| c_int::try_from(v).map_err(|_| Error::invalid(format!("CUDA: {v} is too large for cuBLAS")));
    let (m, n, k) = (int(fout)?, int(rows)?, int(fin)?);
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: with the layouts above cuBLAS reads k·m floats of w (= out·in), k·n of x (= N·in) and writes m·n of
    // y (= N·out), all within the buffers (checked above); lda = ldb = k ≥ rows of the stored matrices and
    // ldc = m, as the column-major views require; alpha/beta are host pointers (the handle's default pointer mode);
    // the handle is bound to the stream that owns the buffers.
    unsafe {
        blas::sgemm(
            *dev.blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            m,
            n,
            k,
            &alpha,
            w.ptr as *const f32,
            k,
            x.ptr as *const f32,
            k,
            &beta,
            y.ptr as *mut f32,
            m,
        )
    }
    .map_err(cuda_err("linear layer (cuBLAS sgemm)"))?;
    kernels.add_bias(dev, y, b, rows, fout)
}
