//! The engine: a tensor, the backend seam and the operations ResNet needs, each with forward and backward.

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod precision;
pub mod tensor;

pub use backend::{Backend, BatchNormSums, BatchStats, ConvGeom, EvalAffine, batch_norm_affine};
pub use precision::Precision;
pub use tensor::Tensor;

/// The f64 that Python would hold for a hyperparameter given to us as f32. The shortest decimal that
/// round-trips an f32 is the literal the user wrote (`0.999`), so coefficients like 1 − β2 and β2ᵗ come out
/// as torch's rather than off by the f32 rounding of β2 (1.3e-5 relative in 1 − β2 for β2 = 0.999).
pub fn widen(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// Target distributions for the loss: each label's one-hot row, label-smoothed as PyTorch does,
/// (1 − ε)·onehot + ε/C. Labels must be below `classes`.
pub fn one_hot(labels: &[usize], classes: usize, smoothing: f32) -> Tensor {
    let mut t = vec![smoothing / classes as f32; labels.len() * classes];
    for (row, &l) in t.chunks_mut(classes.max(1)).zip(labels) {
        row[l] += 1.0 - smoothing;
    }
    Tensor::new(&[labels.len(), classes], t).expect("rows of `classes` values")
}
