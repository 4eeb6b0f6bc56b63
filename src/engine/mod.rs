//! The engine: a tensor, the backend seam and the operations ResNet needs, each with forward and backward.

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod tensor;

pub use backend::{Backend, ConvGeom, EvalAffine, batch_norm_affine};
pub use tensor::Tensor;

/// Target distributions for the loss: each label's one-hot row, label-smoothed as PyTorch does,
/// (1 − ε)·onehot + ε/C. Labels must be below `classes`.
pub fn one_hot(labels: &[usize], classes: usize, smoothing: f32) -> Tensor {
    let mut t = vec![smoothing / classes as f32; labels.len() * classes];
    for (row, &l) in t.chunks_mut(classes.max(1)).zip(labels) {
        row[l] += 1.0 - smoothing;
    }
    Tensor::new(&[labels.len(), classes], t).expect("rows of `classes` values")
}
