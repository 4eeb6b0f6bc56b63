//! What the training loop needs from the device besides a step (`CudaTrainer::forward_backward` + `apply_update`):
//! one read per step carrying the loss, the batch's top-1 hits and the sum of squares of every trainable gradient
//! and every BN running statistic (the numeric guard, gradient clipping and the monitor read these); scaling the
//! gradients (clipping); device-side snapshots of the running statistics (a dropped step puts them back) and of the
//! weights (the monitor's update norms); the momentum buffers out and in (checkpoints, resuming); and, on a failed
//! step, the first layer whose output went non-finite. The reductions are `engine::cuda::train::reduce`'s.

use std::collections::BTreeMap;

use super::{CudaTrainer, numel};
use crate::engine::Tensor;
use crate::engine::cuda::device::{Buf, guarded};
use crate::engine::cuda::train::half::ActRef;
use crate::engine::cuda::train::kernels::int;
use crate::engine::cuda::train::reduce::Table;
use crate::error::{Error, Result};

/// What the host learns from one read after `forward_backward`.
#[derive(Clone, Debug, PartialEq)]
pub struct StepCheck {
    pub loss: f32,
    pub top1_hits: usize,
    /// Per parameter, in the store's order: the sum of squares of its gradient (0 for a frozen parameter).
    pub grad_sumsq: Vec<f64>,
    /// Every BN running statistic is finite.
    pub buffers_finite: bool,
}

impl CudaTrainer {
    /// Per parameter: `values[k]` for the k-th trainable one, 0 for the frozen ones.
    fn per_parameter(&self, values: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.trainable.len()];
        for (&i, &v) in self.looping.trainable.iter().zip(values) {
            out[i] = v;
        }
        out
    }

    /// After `forward_backward`: the loss, the top-1 hits of `labels` (one per image of that batch), every
    /// trainable gradient's sum of squares and whether the running statistics are finite, in one read.
    pub fn check_step(&mut self, labels: &[usize]) -> Result<StepCheck> {
        let (n, classes) = (self.looping.last_batch, self.config.num_classes);
        if n == 0 || labels.len() != n {
            return Err(Error::invalid(format!("CUDA: {} labels for a step over {n} images", labels.len())));
        }
        let labels = labels
            .iter()
            .map(|&l| {
                if l < classes { int(l) } else { Err(Error::invalid(format!("CUDA: label {l} of {classes} classes"))) }
            })
            .collect::<Result<Vec<i32>>>()?;
        guarded("checking the step", || {
            let (dev, k, s) = (&self.dev, &self.loop_kernels, &mut self.looping);
            dev.write(&mut s.labels, &labels)?;
            k.loss_hits(dev, &self.logits, &s.labels, &self.loss, (n, classes), &s.out)?;
            let t = s.grads.count;
            s.grads.sum_squares(dev, k, None, &s.out, 2)?;
            s.buffers.sum_squares(dev, k, None, &s.out, 2 + t)?;
            let out = dev.read(&s.out, 2 + t + s.buffers.count)?;
            Ok(StepCheck {
                loss: out[0] as f32,
                top1_hits: out[1] as usize,
                grad_sumsq: self.per_parameter(&out[2..2 + t]),
                buffers_finite: out[2 + t..].iter().all(|v| v.is_finite()),
            })
        })
    }

    /// Every trainable gradient's sum of squares, per parameter (0 for frozen ones): after `scale_gradients`.
    pub fn grad_sumsq(&self) -> Result<Vec<f64>> {
        guarded("reducing gradients", || {
            let (dev, s) = (&self.dev, &self.looping);
            s.grads.sum_squares(dev, &self.loop_kernels, None, &s.out, 0)?;
            Ok(self.per_parameter(&dev.read(&s.out, s.grads.count)?))
        })
    }

    /// Multiply every trainable gradient by `c` (gradient clipping), as the CPU's `Steps::scale_gradients` does.
    pub fn scale_gradients(&self, c: f32) -> Result<()> {
        guarded("scaling gradients", || {
            let longest = self.looping.trainable.iter().map(|&i| self.grads[i].len).max().unwrap_or(0);
            self.loop_kernels.scale_all(&self.dev, &self.looping.grads, c, longest)
        })
    }

    /// Copy the BN running statistics and the batch count on the device, before a forward that may be dropped.
    pub fn save_running_stats(&mut self) -> Result<()> {
        let first = self.trainable.len();
        guarded("saving running statistics", || {
            if self.looping.stats_copy.is_empty() {
                self.looping.stats_copy =
                    self.table.tensors[first..].iter().map(|t| self.dev.zeros(t.len)).collect::<Result<_>>()?;
            }
            for (src, dst) in self.table.tensors[first..].iter().zip(&mut self.looping.stats_copy) {
                self.dev.copy(src, dst, src.len)?;
            }
            self.looping.tracked_copy = self.batches_tracked;
            Ok(())
        })
    }

    /// Put back what `save_running_stats` copied: a dropped step leaves the statistics as before its forward.
    pub fn restore_running_stats(&mut self) -> Result<()> {
        let first = self.trainable.len();
        if self.looping.stats_copy.len() != self.table.tensors.len() - first {
            return Err(Error::invalid("CUDA: restore_running_stats without save_running_stats"));
        }
        guarded("restoring running statistics", || {
            for (src, dst) in self.looping.stats_copy.iter().zip(&mut self.table.tensors[first..]) {
                self.dev.copy(src, dst, src.len)?;
            }
            self.batches_tracked = self.looping.tracked_copy;
            Ok(())
        })
    }

    /// Copy the trainable weights on the device, before an update `weight_norms` then measures.
    pub fn snapshot_weights(&mut self) -> Result<()> {
        guarded("copying weights", || {
            if self.looping.weights_copy.is_none() {
                let lens: Vec<usize> = self.looping.trainable.iter().map(|&i| self.table.tensors[i].len).collect();
                let copies = lens.iter().map(|&n| self.dev.zeros(n)).collect::<Result<Vec<Buf<f32>>>>()?;
                let table = Table::new(&self.dev, &copies.iter().zip(&lens).map(|(b, &n)| (b, n)).collect::<Vec<_>>())?;
                self.looping.weights_copy = Some((copies, table));
            }
            let Some((copies, _)) = &mut self.looping.weights_copy else { unreachable!("allocated just above") };
            for (&i, dst) in self.looping.trainable.iter().zip(copies) {
                self.dev.copy(&self.table.tensors[i], dst, self.table.tensors[i].len)?;
            }
            Ok(())
        })
    }

    /// Per parameter (0 for frozen ones): the sum of squares of its weights and of their change since
    /// `snapshot_weights`.
    pub fn weight_norms(&self) -> Result<Vec<(f64, f64)>> {
        let Some((_, before)) = &self.looping.weights_copy else {
            return Err(Error::invalid("CUDA: weight_norms without snapshot_weights"));
        };
        guarded("reducing weights", || {
            let (dev, k, s) = (&self.dev, &self.loop_kernels, &self.looping);
            let t = s.weights.count;
            s.weights.sum_squares(dev, k, None, &s.out, 0)?;
            s.weights.sum_squares(dev, k, Some(before), &s.out, t)?;
            let out = dev.read(&s.out, 2 * t)?;
            let (w, d) = (self.per_parameter(&out[..t]), self.per_parameter(&out[t..]));
            Ok(w.into_iter().zip(d).collect())
        })
    }

    /// The SGD momentum buffers as `Optimizer::state` names them (`<parameter>.momentum_buffer`), for the
    /// parameters that have one: what a checkpoint stores.
    pub fn momentum_state(&self) -> Result<BTreeMap<String, Tensor>> {
        guarded("reading momentum buffers", || {
            let mut out = BTreeMap::new();
            for (i, m) in self.moments.iter().enumerate() {
                if self.has_momentum[i] {
                    let t = Tensor::new(&self.table.shapes[i], self.dev.read(m, m.len)?)?;
                    out.insert(format!("{}.momentum_buffer", self.table.names[i]), t);
                }
            }
            Ok(out)
        })
    }

    /// Load momentum buffers named as `momentum_state` names them (from a checkpoint, or from the CPU
    /// optimizer's `state`); parameters not named start without one (their first update sets it, as torch's).
    /// All or nothing: a name or shape that does not fit is an error and changes nothing.
    pub fn load_momentum_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let params = self.trainable.len();
        let mut found = vec![None; params];
        for (key, t) in state {
            let i = key
                .strip_suffix(".momentum_buffer")
                .and_then(|name| self.table.names[..params].iter().position(|n| n == name))
                .ok_or_else(|| Error::invalid(format!("CUDA: unexpected optimizer state {key}")))?;
            if t.shape() != self.table.shapes[i] {
                return Err(Error::invalid(format!(
                    "CUDA: {key} is {:?}, expected {:?}",
                    t.shape(),
                    self.table.shapes[i]
                )));
            }
            found[i] = Some(t);
        }
        guarded("loading momentum buffers", || {
            for (i, t) in found.iter().enumerate() {
                if let Some(t) = t {
                    self.dev.write(&mut self.moments[i], t.data())?;
                }
                self.has_momentum[i] = t.is_some();
            }
            Ok(())
        })
    }

    /// After a non-finite step: the first layer, in forward order, whose output in the last `forward_backward`
    /// held a NaN or an infinity, named as the CPU model names it (`conv1`, `layerI.B`, `fc`).
    pub fn first_nonfinite_output(&self) -> Result<Option<String>> {
        let n = self.looping.last_batch;
        let plan = self.plans.get(&n).ok_or_else(|| Error::invalid("CUDA: no step has run"))?;
        let len = |u: usize| numel(plan.convs[u].shape().y());
        let mut outputs: Vec<(String, ActRef, usize)> = vec![("conv1".into(), self.units[0].a.r(), len(0))];
        for block in &self.blocks {
            let last = block.units[block.units.len() - 1];
            outputs.push((block.name.clone(), self.units[last].a.r(), len(last)));
        }
        outputs.push(("fc".into(), ActRef::F32(&self.logits), n * self.config.num_classes));
        guarded("locating a non-finite output", || {
            // One table per precision (a bf16 trainer's activations, the fp32 logits), sums put back in order.
            let mut sums = vec![0.0; outputs.len()];
            for bf16 in [false, true] {
                let at: Vec<usize> =
                    (0..outputs.len()).filter(|&i| matches!(outputs[i].1, ActRef::Bf16(_)) == bf16).collect();
                if at.is_empty() {
                    continue;
                }
                let table =
                    Table::of(&self.dev, &at.iter().map(|&i| (outputs[i].1, outputs[i].2)).collect::<Vec<_>>())?;
                let out = self.dev.zeros(table.count)?;
                table.sum_squares(&self.dev, &self.loop_kernels, None, &out, 0)?;
                for (&i, s) in at.iter().zip(self.dev.read(&out, table.count)?) {
                    sums[i] = s;
                }
            }
            Ok(outputs.iter().zip(sums).find(|(_, s)| !s.is_finite()).map(|((name, _, _), _)| name.clone()))
        })
    }
}
