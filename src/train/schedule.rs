//! Learning-rate (and momentum) schedules as closed-form functions of the global step, so that a resumed run
//! needs only the step count to continue exactly where it stopped: there is no scheduler state to save.
//!
//! The formulas are torch.optim.lr_scheduler's, evaluated in f64 from the hyperparameters' decimal values
//! (see `optim::widen`) and rounded once to f32. torch updates most schedulers recursively
//! (lr ← lr·factor); the closed forms agree with them up to that accumulated rounding.

use std::f64::consts::PI;

use super::optim::widen;

#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// ×gamma every `step_size` epochs (StepLR) / at each milestone epoch (MultiStepLR).
    Step {
        step_size: u64,
        gamma: f32,
    },
    MultiStep {
        milestones: Vec<u64>,
        gamma: f32,
    },
    /// Linear warm-up from lr·warmup_start_factor over `warmup_epochs`, then cosine to min_lr at the end
    /// (CosineAnnealingLR formula, per step). Equals LinearLR(start_factor, total_iters = warm-up steps) then
    /// CosineAnnealingLR(T_max = remaining steps, eta_min = min_lr) in a SequentialLR stepped every batch.
    /// `min_lr` is an absolute learning rate, like eta_min; after the last step it stays there.
    Cosine {
        warmup_epochs: u64,
        warmup_start_factor: f32,
        min_lr: f32,
    },
    /// OneCycleLR defaults: pct_start 0.3, div_factor 25, final_div_factor 1e4, cosine annealing, momentum
    /// cycled 0.95 → 0.85 → 0.95 (inverse to lr), three_phase false.
    OneCycle {
        pct_start: f32,
        div_factor: f32,
        final_div_factor: f32,
        max_momentum: f32,
        base_momentum: f32,
    },
}

impl Schedule {
    /// Learning rate for global `step` (0-based) given base_lr (the peak/max lr for one-cycle), steps_per_epoch
    /// and total epochs. Step and MultiStep change once per epoch, as PyTorch stepping the scheduler once per
    /// epoch would; Cosine and OneCycle change every step. `steps_per_epoch` 0 counts as 1 and `step_size` 0
    /// as 1 rather than dividing by zero; steps past the end keep the last step's value (torch's OneCycleLR
    /// would raise).
    pub fn lr(&self, base_lr: f32, step: u64, steps_per_epoch: u64, epochs: u64) -> f32 {
        let spe = steps_per_epoch.max(1);
        let epoch = step / spe;
        let base = widen(base_lr);
        let lr = match self {
            Schedule::Constant => base,
            Schedule::Step { step_size, gamma } => base * powu(widen(*gamma), epoch / (*step_size).max(1)),
            Schedule::MultiStep { milestones, gamma } => {
                // bisect_right over the (sorted, repeated) milestones: a milestone counts from its own epoch on.
                let passed = milestones.iter().filter(|&&m| m <= epoch).count() as u64;
                base * powu(widen(*gamma), passed)
            }
            Schedule::Cosine { warmup_epochs, warmup_start_factor, min_lr } => {
                let warm = warmup_epochs.saturating_mul(spe);
                let total = epochs.saturating_mul(spe);
                if step < warm {
                    let f = widen(*warmup_start_factor);
                    base * (f + (1.0 - f) * step as f64 / warm as f64)
                } else {
                    let span = total.saturating_sub(warm);
                    let t = (step - warm).min(span);
                    let progress = if span == 0 { 1.0 } else { t as f64 / span as f64 };
                    let eta_min = widen(*min_lr);
                    eta_min + (base - eta_min) * (1.0 + (PI * progress).cos()) / 2.0
                }
            }
            Schedule::OneCycle { .. } => self.one_cycle(base, step, spe, epochs).0,
        };
        lr as f32
    }

    /// Momentum override for this step (Some only for OneCycle): SGD's momentum or Adam's beta1.
    pub fn momentum(&self, step: u64, steps_per_epoch: u64, epochs: u64) -> Option<f32> {
        match self {
            Schedule::OneCycle { .. } => Some(self.one_cycle(1.0, step, steps_per_epoch.max(1), epochs).1 as f32),
            _ => None,
        }
    }

    /// (lr, momentum) of OneCycleLR at `step`, following torch's get_lr: phase 1 ends at step
    /// pct_start·total − 1 (a float), phase 2 at total − 1, each annealed by cosine from its own start step.
    fn one_cycle(&self, max_lr: f64, step: u64, spe: u64, epochs: u64) -> (f64, f64) {
        let Schedule::OneCycle { pct_start, div_factor, final_div_factor, max_momentum, base_momentum } = self else {
            return (max_lr, 0.0);
        };
        let total = epochs.saturating_mul(spe).max(1);
        let s = step.min(total - 1) as f64;
        let initial_lr = max_lr / widen(*div_factor);
        let min_lr = initial_lr / widen(*final_div_factor);
        let (max_m, base_m) = (widen(*max_momentum), widen(*base_momentum));
        let end1 = widen(*pct_start) * total as f64 - 1.0;
        let end2 = (total - 1) as f64;
        let pct = |start: f64, end: f64| if end > start { (s - start) / (end - start) } else { 1.0 };
        if s <= end1 {
            let p = pct(0.0, end1);
            (anneal_cos(initial_lr, max_lr, p), anneal_cos(max_m, base_m, p))
        } else {
            let p = pct(end1, end2);
            (anneal_cos(max_lr, min_lr, p), anneal_cos(base_m, max_m, p))
        }
    }
}

/// torch's `_annealing_cos`: from `start` at pct 0 to `end` at pct 1.
fn anneal_cos(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0)
}

/// gamma^n for a count that may exceed i32 (powi's exponent type); a huge n just underflows to 0.
fn powu(gamma: f64, n: u64) -> f64 {
    gamma.powf(n as f64)
}
