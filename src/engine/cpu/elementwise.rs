//! ReLU and the residual join, in place. Each chunk's loop is compiled per instruction set (`isa::multiversion`):
//! on the small maps of the digits recipe (2x2 and 4x4, in cache) the baseline's 4-wide SSE loops were bound by
//! their instruction count, not by memory.

use rayon::prelude::*;

use super::isa::multiversion;
use super::relu1;
use crate::engine::Tensor;

const CHUNK: usize = 1 << 14;

multiversion! {
fn relu_chunk(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = relu1(*v));
}
}

multiversion! {
/// g = 0 where the ReLU's output o ≤ 0 (a NaN output passes its gradient, as PyTorch's threshold_backward).
fn mask_chunk(g: &mut [f32], o: &[f32]) {
    g.iter_mut().zip(o).for_each(|(g, &o)| *g = if o <= 0.0 { 0.0 } else { *g });
}
}

multiversion! {
fn add_chunk(a: &mut [f32], b: &[f32], then_relu: bool) {
    if then_relu {
        a.iter_mut().zip(b).for_each(|(a, &b)| *a = relu1(*a + b));
    } else {
        a.iter_mut().zip(b).for_each(|(a, &b)| *a += b);
    }
}
}

pub fn relu(mut x: Tensor) -> Tensor {
    x.data_mut().par_chunks_mut(CHUNK).for_each(relu_chunk);
    x
}

pub fn relu_backward(mut dy: Tensor, y: &Tensor) -> Tensor {
    assert_eq!(dy.shape(), y.shape(), "relu backward: shapes differ");
    dy.data_mut().par_chunks_mut(CHUNK).zip(y.data().par_chunks(CHUNK)).for_each(|(g, o)| mask_chunk(g, o));
    dy
}

pub fn add(mut a: Tensor, b: &Tensor, then_relu: bool) -> Tensor {
    assert_eq!(a.shape(), b.shape(), "add: shapes differ");
    a.data_mut().par_chunks_mut(CHUNK).zip(b.data().par_chunks(CHUNK)).for_each(|(a, b)| add_chunk(a, b, then_relu));
    a
}
