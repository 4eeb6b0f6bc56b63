//! Weight EMA (`--model-ema DECAY`): an exponential moving average of the network, kept beside the one the
//! optimiser moves, evaluated every epoch and saved in every checkpoint, as torchvision's reference script does
//! with `ExponentialMovingAverage` (an `AveragedModel` with `use_buffers=True`).
//!
//! Semantics, from `torch.optim.swa_utils.AveragedModel.update_parameters` and torchvision's `ema_avg`:
//! - the first update copies the network; each later one sets, for every parameter *and* BN running statistic,
//!   `avg = decay · avg + (1 − decay) · value` in f32, the two products rounded separately and then added (the
//!   fixture `ema_update.safetensors` is PyTorch's own result, matched bit for bit);
//! - an update follows every `model_ema_steps`-th applied optimiser step of an epoch (batch index
//!   `i % steps == 0`, torchvision's rule); `DECAY` is the decay of one update (torchvision's `train.py` derives
//!   it from its flags as `1 − (1 − d)·world·batch·steps/epochs`; timm updates every step with `d` itself);
//! - during the lr warm-up epochs the count is reset after each update, so the average restarts from the
//!   network when warm-up ends (torchvision's `n_averaged.fill_(0)`);
//! - `num_batches_tracked` is the network's (PyTorch averages the integer and truncates it; nothing reads it
//!   when BN has a momentum).

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::engine::Tensor;
use crate::error::{Error, Result};
use crate::model::ResNet;

/// Prefix of the EMA's tensors in a training checkpoint (torchvision's checkpoint key is `model_ema`); the
/// tensors under it are a whole torchvision state_dict.
pub const EMA_PREFIX: &str = "model_ema.";
/// Checkpoint metadata key holding the number of updates averaged so far.
pub const AVERAGED_KEY: &str = "model_ema_averaged";

/// The averaged network and how many updates it holds.
pub struct ModelEma {
    pub model: ResNet,
    pub decay: f64,
    /// Updates averaged so far; 0 means the next update copies the network.
    pub n_averaged: u64,
}

impl ModelEma {
    /// An EMA of `source` that has averaged nothing yet (a copy of it).
    pub fn new(source: &ResNet, decay: f64) -> ModelEma {
        let mut model = ResNet::new(source.config, 0);
        copy_into(&mut model, source);
        ModelEma { model, decay, n_averaged: 0 }
    }

    /// Average `source` in (see the header).
    pub fn update(&mut self, source: &ResNet) {
        if self.n_averaged == 0 {
            copy_into(&mut self.model, source);
        } else {
            let (avg, src) = (&mut self.model.store, &source.store);
            let values =
                avg.params.iter_mut().map(|p| &mut p.value).chain(avg.buffers.iter_mut().map(|b| &mut b.value));
            let sources = src.params.iter().map(|p| &p.value).chain(src.buffers.iter().map(|b| &b.value));
            let pairs: Vec<(&mut Tensor, &Tensor)> = values.zip(sources).collect();
            pairs.into_par_iter().for_each(|(a, s)| ema_step(a.data_mut(), s.data(), self.decay));
            avg.batches_tracked = src.batches_tracked;
        }
        self.n_averaged += 1;
    }

    /// The averaged network's tensors under `EMA_PREFIX`, as a checkpoint stores them.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        self.model.state_dict().into_iter().map(|(k, v)| (format!("{EMA_PREFIX}{k}"), v)).collect()
    }

    /// The averaged network's `num_batches_tracked` entries under `EMA_PREFIX`.
    pub fn batch_counts(&self) -> BTreeMap<String, i64> {
        crate::weights::batch_counts(&self.model).into_iter().map(|(k, v)| (format!("{EMA_PREFIX}{k}"), v)).collect()
    }

    /// Put a checkpoint's EMA (tensors without the prefix) in place.
    pub fn restore(&mut self, state: &BTreeMap<String, Tensor>, n_averaged: u64) -> Result<()> {
        self.model.load_state_dict(state).map_err(|e| Error::invalid(format!("its weight EMA: {e}")))?;
        self.n_averaged = n_averaged;
        Ok(())
    }
}

/// `avg = decay·avg + (1 − decay)·src` with PyTorch's roundings: both factors are f32 (the decay, and
/// `1 − decay` computed in f64 first, as Python does before the kernel casts it), each product rounded, then the sum.
pub fn ema_step(avg: &mut [f32], src: &[f32], decay: f64) {
    let (keep, take) = (decay as f32, (1.0 - decay) as f32);
    for (a, &s) in avg.iter_mut().zip(src) {
        *a = keep * *a + take * s;
    }
}

fn copy_into(dst: &mut ResNet, src: &ResNet) {
    for (d, s) in dst.store.params.iter_mut().zip(&src.store.params) {
        d.value = s.value.clone();
    }
    for (d, s) in dst.store.buffers.iter_mut().zip(&src.store.buffers) {
        d.value = s.value.clone();
    }
    dst.store.batches_tracked = src.store.batches_tracked;
}
