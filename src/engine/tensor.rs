//! The engine's tensor: a dense, row-major (NCHW for images) f32 array with its shape.
//!
//! Storage lives on the host for now; a device backend will add its own storage behind the `Backend` seam.

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Wrap `data` as a tensor of `shape`; fails when the element counts differ.
    pub fn new(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let numel = checked_numel(shape)?;
        if numel != data.len() {
            return Err(Error::invalid(format!("shape {shape:?} needs {numel} values, got {}", data.len())));
        }
        Ok(Tensor { shape: shape.to_vec(), data })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Self::full(shape, 0.0)
    }

    pub fn full(shape: &[usize], value: f32) -> Self {
        let numel = shape.iter().product();
        Tensor { shape: shape.to_vec(), data: vec![value; numel] }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The four dimensions of an NCHW tensor. A non-4-d tensor here is an engine bug, not user input.
    pub fn dims4(&self) -> [usize; 4] {
        match self.shape[..] {
            [n, c, h, w] => [n, c, h, w],
            _ => panic!("expected a 4-d NCHW tensor, got shape {:?}", self.shape),
        }
    }

    /// The two dimensions of a matrix-shaped tensor.
    pub fn dims2(&self) -> [usize; 2] {
        match self.shape[..] {
            [r, c] => [r, c],
            _ => panic!("expected a 2-d tensor, got shape {:?}", self.shape),
        }
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        Tensor::new(shape, self.data)
    }

    /// True when every value is finite (no NaN, no ±inf).
    pub fn all_finite(&self) -> bool {
        // x·0 is 0 for finite x and NaN for NaN or ±inf; sixteen independent lanes let this vectorise (a
        // short-circuiting `all` does not), so the training loop can afford it on every activation.
        let mut lanes = [0.0f32; 16];
        let chunks = self.data.chunks_exact(16);
        let tail_finite = chunks.remainder().iter().all(|v| v.is_finite());
        for c in chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += v * 0.0;
            }
        }
        tail_finite && lanes.iter().all(|l| *l == 0.0)
    }
}

/// Product of the dimensions, refusing overflow (shapes can come from hostile file headers).
pub fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(format!("shape {shape:?} is too large")))
}
