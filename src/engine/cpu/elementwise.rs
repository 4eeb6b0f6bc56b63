//! ReLU and the residual join, in place.

use rayon::prelude::*;

use super::relu1;
use crate::engine::Tensor;

const CHUNK: usize = 1 << 14;

pub fn relu(mut x: Tensor) -> Tensor {
    x.data_mut().par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v = relu1(*v)));
    x
}

pub fn relu_backward(mut dy: Tensor, y: &Tensor) -> Tensor {
    assert_eq!(dy.shape(), y.shape(), "relu backward: shapes differ");
    dy.data_mut().par_chunks_mut(CHUNK).zip(y.data().par_chunks(CHUNK)).for_each(|(g, o)| {
        g.iter_mut().zip(o).for_each(|(g, &o)| {
            if o <= 0.0 {
                *g = 0.0
            }
        })
    });
    dy
}

pub fn add(mut a: Tensor, b: &Tensor, then_relu: bool) -> Tensor {
    assert_eq!(a.shape(), b.shape(), "add: shapes differ");
    a.data_mut().par_chunks_mut(CHUNK).zip(b.data().par_chunks(CHUNK)).for_each(|(a, b)| {
        a.iter_mut().zip(b).for_each(|(a, &b)| {
            let s = *a + b;
            *a = if then_relu { relu1(s) } else { s };
        })
    });
    a
}
