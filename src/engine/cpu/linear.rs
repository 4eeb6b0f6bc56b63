//! The fully connected head: y = x·wᵀ + b. Its weight and bias gradients add over the batch per `batch_sum` chunk.
//! With bf16 operands (`Operands::Bf16`) x, w and dy are rounded to bf16 first and multiplied in f32: a product
//! of two bf16 values is exact in f32, so that is a bf16 GEMM with f32 accumulation (the head is 0.01 % of
//! ResNet-34's multiplies, not worth a packed kernel).

use super::Operands;
use super::batch_sum;
use super::matmul::{MatRef, matmul};
use super::packed::{from_bf16, to_bf16};
use crate::engine::Tensor;

/// `t` as `operands` multiply it: itself, or rounded to bf16 (held in f32).
fn operand<'a>(t: &'a Tensor, operands: Operands) -> std::borrow::Cow<'a, Tensor> {
    match operands {
        Operands::F32 => std::borrow::Cow::Borrowed(t),
        Operands::Bf16 => {
            let mut r = t.clone();
            r.data_mut().iter_mut().for_each(|v| *v = from_bf16(to_bf16(*v)));
            std::borrow::Cow::Owned(r)
        }
    }
}

pub fn forward(x: &Tensor, w: &Tensor, b: &[f32], operands: Operands) -> Tensor {
    let (x, w) = (operand(x, operands), operand(w, operands));
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
    operands: Operands,
) -> (Option<Tensor>, Option<(Tensor, Vec<f32>)>) {
    let (x, w, dy) = (operand(x, operands), operand(w, operands), operand(dy, operands));
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
