//! Optimisers with torch.optim's semantics (SGD with momentum/Nesterov, Adam, AdamW), so that a recipe
//! written for PyTorch trains the same way here and an optimiser checkpoint means the same thing.
//!
//! Each update follows torch's single-tensor (CPU) code path operation by operation, in f32 like the
//! parameters, with the scalar coefficients (bias corrections, step size, decay factor) computed in f64 and
//! rounded once, as Python computes them before handing them to the kernels. Parameters are independent, so
//! they are updated in parallel; each one's arithmetic is sequential, which keeps updates bit-reproducible.

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;

use crate::engine::Tensor;
pub use crate::engine::widen;
use crate::error::{Error, Result};
pub use crate::exec::optim::{OptimizerKind, ParamGroup};
use crate::model::store::Param;

/// What one parameter carries between steps. Created on the parameter's first update, as torch fills
/// `optimizer.state[p]` lazily, so a parameter that never had a gradient has nothing to save.
#[derive(Clone, Debug, PartialEq)]
enum Slot {
    Empty,
    Momentum(Vec<f32>),
    /// `step` is per parameter, as in torch: a parameter unfrozen late starts its bias correction at 1.
    Adam {
        step: u64,
        exp_avg: Vec<f32>,
        exp_avg_sq: Vec<f32>,
    },
}

pub struct Optimizer {
    kind: OptimizerKind,
    groups: Vec<ParamGroup>,
    slots: Vec<Slot>,
    steps: u64,
}

/// Shared, read-only inputs of one update.
#[derive(Clone, Copy)]
struct StepArgs {
    kind: OptimizerKind,
    lr: f64,
    momentum: Option<f32>,
}

impl Optimizer {
    /// `groups[i]` applies to `params[i]` (same order as model.store.params).
    pub fn new(kind: OptimizerKind, groups: Vec<ParamGroup>) -> Self {
        Optimizer { kind, groups, slots: Vec::new(), steps: 0 }
    }

    /// Groups for a model: weight decay `wd` on every parameter, or (no_decay_bn_bias) 0 for 1-d parameters
    /// (BN weights/biases, fc.bias) as torchvision's reference recipes do, since decaying a BN scale or a bias
    /// only fights the normalisation; lr_scale `head_lr_scale` for parameters whose name starts with "fc."
    /// and 1 otherwise, for fine-tuning a fresh head faster than a pretrained body.
    pub fn groups_for(params: &[Param], wd: f32, no_decay_bn_bias: bool, head_lr_scale: f32) -> Vec<ParamGroup> {
        params
            .iter()
            .map(|p| ParamGroup {
                lr_scale: if p.name.starts_with("fc.") { head_lr_scale } else { 1.0 },
                weight_decay: if no_decay_bn_bias && p.value.shape().len() <= 1 { 0.0 } else { wd },
            })
            .collect()
    }

    /// One update with learning rate `lr` (× each group's lr_scale); `momentum` overrides SGD momentum / Adam
    /// beta1 when Some (one-cycle cycles it). Parameters that are frozen (`trainable == false`) or have no grad
    /// are skipped, as PyTorch skips p.grad is None: their state (and Adam's per-parameter step) stays as is.
    pub fn step(&mut self, params: &mut [Param], lr: f32, momentum: Option<f32>) {
        assert_eq!(params.len(), self.groups.len(), "the optimizer was built for another parameter list");
        if self.slots.len() != params.len() {
            self.slots = vec![Slot::Empty; params.len()];
        }
        let args = StepArgs { kind: self.kind, lr: widen(lr), momentum };
        params.par_iter_mut().zip(self.slots.par_iter_mut()).zip(self.groups.par_iter()).for_each(|((p, slot), g)| {
            let Param { value, grad, trainable, .. } = p;
            if let (true, Some(grad)) = (*trainable, grad.as_ref()) {
                update(args, g, value.data_mut(), grad.data(), slot);
            }
        });
        self.steps += 1;
    }

    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// One group per parameter, in the store's order.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Optimizer state for checkpoints: tensors named "<param name>.momentum_buffer" / ".exp_avg" /
    /// ".exp_avg_sq" plus the step count, and back. Adam and AdamW also save "<param name>.step" (shape []),
    /// the per-parameter count their bias correction uses; like torch's, it is an f32, exact to 2^24 steps,
    /// beyond which 1 − βᵗ is 1 in f32 anyway. Loading checks names and shapes and returns a one-line
    /// crate::Error on mismatch.
    pub fn state(&self, params: &[Param]) -> (BTreeMap<String, Tensor>, u64) {
        let mut out = BTreeMap::new();
        let as_tensor = |p: &Param, v: &[f32]| {
            Tensor::new(p.value.shape(), v.to_vec()).expect("state() is given the parameters step() updated")
        };
        for (p, slot) in params.iter().zip(&self.slots) {
            match slot {
                Slot::Empty => {}
                Slot::Momentum(buf) => {
                    out.insert(format!("{}.momentum_buffer", p.name), as_tensor(p, buf));
                }
                Slot::Adam { step, exp_avg, exp_avg_sq } => {
                    out.insert(format!("{}.exp_avg", p.name), as_tensor(p, exp_avg));
                    out.insert(format!("{}.exp_avg_sq", p.name), as_tensor(p, exp_avg_sq));
                    out.insert(format!("{}.step", p.name), Tensor::full(&[], *step as f32));
                }
            }
        }
        (out, self.steps)
    }

    /// All or nothing: every problem is listed in the one error, and a failed load leaves the optimizer as it
    /// was, so a bad checkpoint cannot leave half of the parameters with stale moments.
    pub fn load_state(&mut self, params: &[Param], tensors: &BTreeMap<String, Tensor>, steps: u64) -> Result<()> {
        if params.len() != self.groups.len() {
            return Err(Error::invalid(format!(
                "optimizer state: the optimizer has {} parameter groups, the model {} parameters",
                self.groups.len(),
                params.len()
            )));
        }
        let adam = !matches!(self.kind, OptimizerKind::Sgd { .. });
        let fields: &[&str] = if adam { &["exp_avg", "exp_avg_sq", "step"] } else { &["momentum_buffer"] };
        let index: HashMap<&str, usize> = params.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
        // found[param][field]
        let mut found: Vec<Vec<Option<&Tensor>>> = vec![vec![None; fields.len()]; params.len()];
        let mut problems = Vec::new();
        for (key, t) in tensors {
            let slot = key
                .rsplit_once('.')
                .and_then(|(name, field)| Some((*index.get(name)?, fields.iter().position(|f| *f == field)?)));
            let Some((i, f)) = slot else {
                problems.push(format!("unexpected {key}"));
                continue;
            };
            let want: &[usize] = if fields[f] == "step" { &[] } else { params[i].value.shape() };
            if t.shape() != want {
                problems.push(format!("{key} is {:?}, expected {want:?}", t.shape()));
            } else if fields[f] == "step" && !t.data().iter().all(|v| *v >= 0.0 && v.fract() == 0.0) {
                problems.push(format!("{key} is {:?}, not a step count", t.data()));
            } else {
                found[i][f] = Some(t);
            }
        }
        let mut slots = vec![Slot::Empty; params.len()];
        for ((p, got), slot) in params.iter().zip(&found).zip(&mut slots) {
            match got[..] {
                [None] | [None, None, None] => {}
                [Some(buf)] => *slot = Slot::Momentum(buf.data().to_vec()),
                [Some(m), Some(v), Some(s)] => {
                    let step = s.data().first().map_or(0, |&x| x as u64);
                    *slot = Slot::Adam { step, exp_avg: m.data().to_vec(), exp_avg_sq: v.data().to_vec() };
                }
                _ => {
                    let missing: Vec<&str> =
                        fields.iter().zip(got).filter(|(_, t)| t.is_none()).map(|(f, _)| *f).collect();
                    problems.push(format!("{} lacks {}", p.name, missing.join(", ")));
                }
            }
        }
        if !problems.is_empty() {
            let n = problems.len();
            let shown: Vec<_> = problems.into_iter().take(8).collect();
            let more = if n > 8 { format!(" and {} more", n - 8) } else { String::new() };
            return Err(Error::invalid(format!("optimizer state does not fit: {}{more}", shown.join("; "))));
        }
        self.slots = slots;
        self.steps = steps;
        Ok(())
    }
}

/// One parameter's update, in torch's operation order (torch/optim/sgd.py and adam.py, `_single_tensor_*`).
fn update(args: StepArgs, group: &ParamGroup, p: &mut [f32], grad: &[f32], slot: &mut Slot) {
    let lr = args.lr * widen(group.lr_scale);
    let wd_f64 = widen(group.weight_decay);
    let wd = group.weight_decay;
    // torch adds weight decay into a copy of the gradient (`grad.add(param, alpha=wd)`) only when it is set.
    let decayed = |i: usize, p: f32| if wd != 0.0 { grad[i] + wd * p } else { grad[i] };
    match args.kind {
        OptimizerKind::Sgd { momentum, nesterov } => {
            let m = args.momentum.unwrap_or(momentum);
            let neg_lr = (-lr) as f32;
            if m == 0.0 {
                for (i, w) in p.iter_mut().enumerate() {
                    *w += neg_lr * decayed(i, *w);
                }
                return;
            }
            match slot {
                Slot::Momentum(buf) => {
                    assert_eq!(buf.len(), p.len(), "step() is given the parameters it was built for");
                    for (i, (w, b)) in p.iter_mut().zip(buf.iter_mut()).enumerate() {
                        let g = decayed(i, *w);
                        *b = *b * m + g;
                        let d = if nesterov { g + m * *b } else { *b };
                        *w += neg_lr * d;
                    }
                }
                // First step: the buffer is the (decayed) gradient itself, not momentum·0 + g.
                _ => {
                    let mut buf = Vec::with_capacity(p.len());
                    for (i, w) in p.iter_mut().enumerate() {
                        let g = decayed(i, *w);
                        buf.push(g);
                        let d = if nesterov { g + m * g } else { g };
                        *w += neg_lr * d;
                    }
                    *slot = Slot::Momentum(buf);
                }
            }
        }
        OptimizerKind::Adam { beta1, beta2, eps } | OptimizerKind::AdamW { beta1, beta2, eps } => {
            let decoupled = matches!(args.kind, OptimizerKind::AdamW { .. });
            if !matches!(slot, Slot::Adam { .. }) {
                *slot = Slot::Adam { step: 0, exp_avg: vec![0.0; p.len()], exp_avg_sq: vec![0.0; p.len()] };
            }
            let Slot::Adam { step, exp_avg, exp_avg_sq } = slot else { unreachable!("set just above") };
            assert_eq!(exp_avg.len(), p.len(), "step() is given the parameters it was built for");
            *step += 1;
            let b1 = widen(args.momentum.unwrap_or(beta1));
            let b2 = widen(beta2);
            let t = *step as f64;
            let bias_correction1 = 1.0 - b1.powf(t);
            let bias_correction2 = 1.0 - b2.powf(t);
            let neg_step_size = (-(lr / bias_correction1)) as f32;
            let bc2_sqrt = bias_correction2.sqrt() as f32;
            let w1 = (1.0 - b1) as f32; // lerp weight
            let b2 = b2 as f32;
            let one_minus_b2 = (1.0 - widen(beta2)) as f32;
            let shrink = (1.0 - lr * wd_f64) as f32;
            for (i, ((w, m), v)) in p.iter_mut().zip(exp_avg.iter_mut()).zip(exp_avg_sq.iter_mut()).enumerate() {
                let g = if decoupled {
                    if wd != 0.0 {
                        *w *= shrink;
                    }
                    grad[i]
                } else {
                    decayed(i, *w)
                };
                // exp_avg.lerp_(grad, 1 − β1), with ATen's two-sided lerp formula.
                *m = if w1 < 0.5 { *m + w1 * (g - *m) } else { g - (g - *m) * (1.0 - w1) };
                *v = *v * b2 + one_minus_b2 * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *w += neg_step_size * *m / denom;
            }
        }
    }
}

/// The factor clipping scales gradients of global norm `norm` by (torch's `clip_grad_norm_`), or None when they
/// stay as they are (the norm is within `max_norm`, or not finite).
pub fn clip_coefficient(norm: f64, max_norm: f32) -> Option<f32> {
    let coef = widen(max_norm) / (norm + 1e-6);
    (norm.is_finite() && coef < 1.0).then_some(coef as f32)
}
