//! The fully connected head: y = x·wᵀ + b. Its weight and bias gradients add over the batch per `batch_sum` chunk.

use super::batch_sum;
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
    // Per `batch_sum` chunk of rows, the chunks added pairwise: the sums a split over ranks makes.
    let dw = need_dw.then(|| {
        let (mut dws, mut dbs) = (Vec::new(), Vec::new());
        for rows in batch_sum::chunks(n) {
            let mut dw = vec![0.0f32; out * fin];
            let dyc = &dy.data()[rows.start * out..rows.end * out];
            let xc = MatRef::new(&x.data()[rows.start * fin..rows.end * fin], rows.len(), fin);
            matmul(&mut dw, MatRef::new(dyc, rows.len(), out).t(), xc, false, threads());
            let mut db = vec![0.0f32; out];
            for row in dyc.chunks(out.max(1)) {
                db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
            }
            dws.push(dw);
            dbs.push(db);
        }
        if dws.is_empty() {
            return (Tensor::zeros(&[out, fin]), vec![0.0; out]);
        }
        let dw = Tensor::new(&[out, fin], batch_sum::pairwise(dws)).expect("dw shape");
        (dw, batch_sum::pairwise(dbs))
    });
    (dx, dw)
}

fn threads() -> usize {
    rayon::current_num_threads()
}
