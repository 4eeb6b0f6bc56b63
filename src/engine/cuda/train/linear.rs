//! The fully connected head's backward through cuBLAS, for y = x·wᵀ + b with row-major x `[N, in]`,
//! w `[out, in]`, dy `[N, out]` (the bias gradient comes with the loss kernel).
//!
//! cuBLAS is column-major, and a row-major `[r, c]` matrix is, seen column-major, its transpose `[c, r]` with
//! leading dimension c. So x is seen as xᵀ `[in, N]` (ld in), w as wᵀ `[in, out]` (ld in), dy as dyᵀ `[out, N]`
//! (ld out), and a row-major result is produced by computing its transpose column-major:
//!
//! - dx = dy·w, so dxᵀ `[in, N]` = wᵀ·dyᵀ = (w seen, op N) `[in, out]` · (dy seen, op N) `[out, N]`:
//!   sgemm(N, N, m = in, n = N, k = out, A = w, lda = in, B = dy, ldb = out, C = dx, ldc = in).
//! - dw = dyᵀ·x, so dwᵀ `[in, out]` = xᵀ·dy = (x seen, op N) `[in, N]` · (dy seen, op T) `[N, out]`:
//!   sgemm(N, T, m = in, n = out, k = N, A = x, lda = in, B = dy, ldb = out, C = dw, ldc = in).

use std::ffi::c_int;

use cudarc::cublas::{result as blas, sys};

use super::super::device::{Buf, Device, cuda_err};
use super::kernels::int;
use crate::error::{Error, Result};

/// C = op_a(A)·op_b(B), column-major, C `[m, n]`; A, B and C are device addresses.
#[allow(clippy::too_many_arguments)]
fn gemm(
    dev: &Device,
    (ta, tb): (sys::cublasOperation_t, sys::cublasOperation_t),
    (m, n, k): (c_int, c_int, c_int),
    (a, lda): (u64, c_int),
    (b, ldb): (u64, c_int),
    (c, ldc): (u64, c_int),
    what: &str,
) -> Result<()> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the caller checked that A, B and C hold the matrices these dimensions and leading dimensions
    // describe, and that C does not overlap A or B; alpha/beta are host pointers (the handle's default pointer
    // mode); the handle is bound to the stream that owns every buffer.
    unsafe {
        blas::sgemm(
            *dev.blas.handle(),
            ta,
            tb,
            m,
            n,
            k,
            &alpha,
            a as *const f32,
            lda,
            b as *const f32,
            ldb,
            &beta,
            c as *mut f32,
            ldc,
        )
    }
    .map_err(cuda_err(what))
}

/// dw (overwritten) and dx (overwritten) of the linear layer; `rows` = N, `fin` = in, `fout` = out.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dev: &Device,
    x: &Buf<f32>,
    w: &Buf<f32>,
    dy: &Buf<f32>,
    dw: &Buf<f32>,
    dx: &Buf<f32>,
    rows: usize,
    fin: usize,
    fout: usize,
) -> Result<()> {
    if x.len < rows * fin || dx.len < rows * fin || w.len < fout * fin || dw.len < fout * fin || dy.len < rows * fout {
        return Err(Error::invalid("CUDA: buffers too small for the linear layer's backward"));
    }
    let (n, i, o) = (int(rows)?, int(fin)?, int(fout)?);
    let (op_n, op_t) = (sys::cublasOperation_t::CUBLAS_OP_N, sys::cublasOperation_t::CUBLAS_OP_T);
    // With the column-major views above, cuBLAS reads in·out floats of w, out·N of dy and in·N of x and writes
    // in·N floats of dx and in·out of dw, all within the buffers (checked above).
    gemm(dev, (op_n, op_n), (i, n, o), (w.ptr, i), (dy.ptr, o), (dx.ptr, i), "linear backward data (cuBLAS sgemm)")?;
    gemm(dev, (op_n, op_t), (i, o, n), (x.ptr, i), (dy.ptr, o), (dw.ptr, i), "linear backward weights (cuBLAS sgemm)")
}
