//! Softmax cross-entropy, PyTorch's `CrossEntropyLoss(label_smoothing=ε)` with mean reduction.

use crate::engine::Tensor;

/// With q = (1−ε)·onehot(target) + ε/C and p = softmax(logits): loss = mean over rows of −Σ q·log p, and
/// dloss/dlogits = (p − q)/N. Computed in f64 so that the loss of a confident model does not lose its digits.
pub fn softmax_cross_entropy(logits: &Tensor, targets: &[usize], smoothing: f32) -> (f32, Tensor) {
    let [n, c] = logits.dims2();
    assert_eq!(targets.len(), n, "cross entropy: {n} rows but {} targets", targets.len());
    assert!(targets.iter().all(|&t| t < c), "cross entropy: a target is not below the class count {c}");
    let eps = smoothing as f64;
    let mut grad = vec![0.0f32; n * c];
    let mut total = 0.0f64;
    for ((row, g), &t) in logits.data().chunks(c).zip(grad.chunks_mut(c)).zip(targets) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum_exp: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        let log_z = max + sum_exp.ln();
        for (j, (&v, gj)) in row.iter().zip(g.iter_mut()).enumerate() {
            let q = eps / c as f64 + if j == t { 1.0 - eps } else { 0.0 };
            let log_p = v as f64 - log_z;
            total -= q * log_p;
            *gj = ((log_p.exp() - q) / n as f64) as f32;
        }
    }
    ((total / n.max(1) as f64) as f32, Tensor::new(&[n, c], grad).expect("grad has the logits' shape"))
}
