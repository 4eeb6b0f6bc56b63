//! The fully connected head: y = x·wᵀ + b.

use super::matmul::{MatRef, matmul};
use crate::engine::Tensor;

pub fn forward(x: &Tensor, w: &Tensor, b: &[f32]) -> Tensor {
    let [n, fin] = x.dims2();
    let [out, win] = w.dims2();
    assert!(fin == win && b.len() == out, "linear: input {fin}, weight [{out}, {win}], bias {}", b.len());
    let mut y = vec![0.0f32; n * out];
    matmul(&mut y, MatRef::new(x.data(), n, fin), MatRef::new(w.data(), out, fin).t(), false, threads());
    for row in y.chunks_mut(out.max(1)) {
        row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
    }
    Tensor::new(&[n, out], y).expect("linear output shape")
}

pub fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    need_dx: bool,
    need_dw: bool,
) -> (Option<Tensor>, Option<(Tensor, Vec<f32>)>) {
    let [n, fin] = x.dims2();
    let [out, _] = w.dims2();
    assert_eq!(dy.shape(), [n, out], "linear backward: dy has the wrong shape");
    let dym = MatRef::new(dy.data(), n, out);
    let dx = need_dx.then(|| {
        let mut dx = vec![0.0f32; n * fin];
        matmul(&mut dx, dym, MatRef::new(w.data(), out, fin), false, threads());
        Tensor::new(&[n, fin], dx).expect("dx shape")
    });
    let dw = need_dw.then(|| {
        let mut dw = vec![0.0f32; out * fin];
        matmul(&mut dw, dym.t(), MatRef::new(x.data(), n, fin), false, threads());
        let mut db = vec![0.0f32; out];
        for row in dy.data().chunks(out.max(1)) {
            db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
        (Tensor::new(&[out, fin], dw).expect("dw shape"), db)
    });
    (dx, dw)
}

fn threads() -> usize {
    rayon::current_num_threads()
}
