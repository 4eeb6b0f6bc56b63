//! Softmax cross-entropy against target distributions, mean over the batch.

use crate::engine::Tensor;

/// With p = softmax(logits) and q the target rows: loss = mean over rows of −Σ q·log p, and
/// dloss/dlogits = (p·Σq − q)/N (Σq = 1 for proper distributions). Computed in f64 so that the loss of a
/// confident model keeps its digits.
pub fn softmax_cross_entropy(logits: &Tensor, targets: &Tensor) -> (f32, Tensor) {
    let [n, c] = logits.dims2();
    assert_eq!(targets.shape(), [n, c], "cross entropy: targets must match the logits' shape");
    let mut grad = vec![0.0f32; n * c];
    let mut total = 0.0f64;
    for ((row, q), g) in logits.data().chunks(c).zip(targets.data().chunks(c)).zip(grad.chunks_mut(c)) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let log_z = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        let q_sum: f64 = q.iter().map(|&v| v as f64).sum();
        for ((&v, &qj), gj) in row.iter().zip(q).zip(g.iter_mut()) {
            let log_p = v as f64 - log_z;
            total -= qj as f64 * log_p;
            *gj = ((log_p.exp() * q_sum - qj as f64) / n as f64) as f32;
        }
    }
    ((total / n.max(1) as f64) as f32, Tensor::new(&[n, c], grad).expect("grad has the logits' shape"))
}
