//! Training checkpoints: one safetensors file holding the network under torchvision's keys (so it loads into
//! PyTorch or `resnet predict` as is), the optimiser state under `optimizer.*`, and in the metadata the recipe
//! and the loop's position, plus a checksum verified on load. Written atomically: a crash leaves the previous
//! checkpoint intact.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::optim::Optimizer;
use super::recipe::Recipe;
use crate::engine::Tensor;
use crate::error::{Error, Result};
use crate::model::ResNet;
use crate::weights;

pub const FORMAT: &str = "resnet-rs-train/1";
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

/// Where the loop stands. All randomness derives from (seed, epoch, index), so this is the whole RNG state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Current epoch (0-based) and how many of its batches are done.
    pub epoch: u64,
    pub batch: u64,
    /// Optimiser steps taken in total (the schedule's clock).
    pub global_step: u64,
    pub best_top1: f64,
    /// Steps skipped for non-finite gradients (`--skip-nonfinite`).
    pub skipped: u64,
}

pub struct Checkpoint {
    pub recipe: Recipe,
    pub position: Position,
    pub model: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub optimizer_steps: u64,
}

pub fn save(path: &Path, model: &ResNet, opt: &Optimizer, recipe: &Recipe, pos: &Position) -> Result<()> {
    let mut tensors = model.state_dict();
    let (state, steps) = opt.state(&model.store.params);
    for (k, v) in state {
        tensors.insert(format!("{OPTIMIZER_PREFIX}{k}"), v);
    }
    let metadata = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("arch".to_string(), recipe.arch.clone()),
        ("recipe".to_string(), recipe.to_toml()),
        ("position".to_string(), serde_json::to_string(pos).map_err(Error::invalid)?),
        ("optimizer_steps".to_string(), steps.to_string()),
    ]);
    weights::safetensors::save(path, &tensors, &weights::batch_counts(model), &metadata)
}

pub fn load(path: &Path) -> Result<Checkpoint> {
    let loaded = weights::safetensors::load(path)?;
    if !loaded.checksum_verified {
        return Err(Error::file(path, "not a resnet-rs training checkpoint (no checksum)"));
    }
    let meta = |key: &str| {
        loaded
            .metadata
            .get(key)
            .ok_or_else(|| Error::file(path, format!("not a training checkpoint (no '{key}' metadata)")))
    };
    if meta("format")? != FORMAT {
        return Err(Error::file(path, format!("unsupported checkpoint format '{}'", meta("format")?)));
    }
    let recipe = Recipe::parse(meta("recipe")?).map_err(|e| e.in_file(path))?;
    let position: Position = serde_json::from_str(meta("position")?)
        .map_err(|e| Error::file(path, format!("bad position metadata: {e}")))?;
    let optimizer_steps =
        meta("optimizer_steps")?.parse().map_err(|_| Error::file(path, "bad optimizer_steps metadata"))?;
    let (mut model, mut optimizer) = (BTreeMap::new(), BTreeMap::new());
    for (k, v) in loaded.tensors {
        match k.strip_prefix(OPTIMIZER_PREFIX) {
            Some(rest) => optimizer.insert(rest.to_string(), v),
            None => model.insert(k, v),
        };
    }
    Ok(Checkpoint { recipe, position, model, optimizer, optimizer_steps })
}
