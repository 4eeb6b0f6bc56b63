//! What an optimiser step is, as the executors take it: torch.optim's kinds and their per-parameter groups.
//! The CPU optimiser (`train::optim::Optimizer`) and the CUDA trainer both run these, so the description sits
//! below both.

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// torch.optim.SGD with dampening 0. `momentum` 0 keeps no buffer at all, as torch does.
    Sgd { momentum: f32, nesterov: bool },
    /// torch.optim.Adam: weight decay is L2, added to the gradient before the moments.
    Adam { beta1: f32, beta2: f32, eps: f32 },
    /// torch.optim.AdamW: weight decay shrinks the parameter directly and never enters the moments.
    AdamW { beta1: f32, beta2: f32, eps: f32 },
}

/// Per-parameter settings: learning-rate multiplier (e.g. a separate head lr) and weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamGroup {
    pub lr_scale: f32,
    pub weight_decay: f32,
}
