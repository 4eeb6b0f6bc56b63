//! Training checkpoints: one safetensors file holding the network under torchvision's keys (so it loads into
//! PyTorch or `resnet predict` as is), the optimiser state under `optimizer.*`, the weight EMA (`--model-ema`)
//! under `model_ema.*` with its update count in the metadata, and in the metadata the recipe,
//! the loop's position and the model card (arch, stem, class names, evaluation preprocessing: what `predict`
//! needs to give the answers `eval` measured), plus a checksum verified on load. Written atomically: a crash
//! leaves the previous checkpoint intact. `open_model` opens any weights file for inference.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ema::{AVERAGED_KEY, ModelEma};
use super::optim::Optimizer;
use super::recipe::Recipe;
use crate::engine::Tensor;
use crate::error::{Error, Result};
use crate::infer::card::{ModelCard, Preprocess};
use crate::model::{Arch, ResNet};
use crate::weights;

pub const FORMAT: &str = "resnet-rs-train/1";

/// The format of a `resnet quantize` file: the network of a training checkpoint (no optimiser state, so not
/// resumable) with its recipe and an int8 calibration.
pub const QUANTIZED_FORMAT: &str = "resnet-rs-quantized/1";
pub use crate::weights::{EMA_PREFIX, OPTIMIZER_PREFIX, Variant};

/// Where the loop stands. All randomness derives from (seed, epoch, index), so this is the whole RNG state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Position {
    /// Current epoch (0-based) and how many of its batches are done.
    pub epoch: u64,
    pub batch: u64,
    /// Optimiser steps taken in total (the schedule's clock).
    pub global_step: u64,
    pub best_top1: f64,
    /// The epoch (1-based) whose evaluation gave `best_top1`, which `best.safetensors` holds.
    pub best_epoch: u64,
    /// Steps skipped for non-finite gradients (`--skip-nonfinite`).
    pub skipped: u64,
    /// The data-parallel ranks whose steps `batch` and `global_step` count (0, in checkpoints older than this
    /// field, means 1).
    pub ranks: u64,
}

impl Position {
    /// The same point of the run counted in steps of `ranks` ranks, when the checkpoint was written by another
    /// number (`--resume` under another world size). Rank r takes every world-th sample of the epoch's shuffled
    /// order from r on (`loader::Shard`), so after k steps the ranks together have consumed exactly its first
    /// k·batch·world samples, whatever the world: the epoch continues after that prefix, rounded down to whole
    /// steps of the new world, and the schedule's clock becomes the new world's step count (its lr curve over
    /// the epochs unchanged). Returns the note that says so, or None when the world is the same.
    pub fn rescale(&mut self, ranks: u64, batch_size: u64, steps_per_epoch: u64) -> Option<String> {
        let (old, ranks) = (self.ranks.max(1), ranks.max(1));
        if old == ranks {
            return None;
        }
        let seen = self.batch * batch_size * old;
        let per_step = batch_size * ranks;
        let was = self.global_step;
        self.batch = seen / per_step;
        self.global_step = self.epoch * steps_per_epoch + self.batch;
        self.ranks = ranks;
        let again = seen - self.batch * per_step;
        let again = if again > 0 { format!(", the {again} samples before it seen again") } else { String::new() };
        Some(format!(
            "resumed on {ranks} rank(s) from a checkpoint written by {old}: epoch {} continues after sample {} of its \
             order{again}; step {was} of {old} rank(s) is step {} here (--max-steps counts these), effective batch \
             {} at the stored lr",
            self.epoch + 1,
            self.batch * per_step,
            self.global_step,
            per_step
        ))
    }
}

pub struct Checkpoint {
    pub recipe: Recipe,
    pub position: Position,
    pub model: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub optimizer_steps: u64,
    /// The weight EMA's state_dict (keys without the prefix) and the number of updates it holds.
    pub ema: Option<(BTreeMap<String, Tensor>, u64)>,
}

pub fn save(
    path: &Path,
    model: &ResNet,
    opt: &Optimizer,
    ema: Option<&ModelEma>,
    recipe: &Recipe,
    pos: &Position,
    card: &ModelCard,
) -> Result<()> {
    let mut tensors = model.state_dict();
    let (state, steps) = opt.state(&model.store.params);
    for (k, v) in state {
        tensors.insert(format!("{OPTIMIZER_PREFIX}{k}"), v);
    }
    let mut counts = weights::batch_counts(model);
    let mut metadata = card.to_metadata()?;
    if let Some(ema) = ema {
        tensors.extend(ema.state());
        counts.extend(ema.batch_counts());
        metadata.insert(AVERAGED_KEY.to_string(), ema.n_averaged.to_string());
    }
    metadata.extend([
        ("format".to_string(), FORMAT.to_string()),
        ("recipe".to_string(), recipe.to_toml()),
        ("position".to_string(), serde_json::to_string(pos).map_err(Error::invalid)?),
        ("optimizer_steps".to_string(), steps.to_string()),
    ]);
    weights::safetensors::save(path, &tensors, &counts, &metadata)
}

/// A network opened for inference with what it takes to run it.
pub struct Opened {
    pub model: ResNet,
    /// From the file's metadata; for our older checkpoints from their recipe; else torchvision's ImageNet
    /// defaults without class names.
    pub card: ModelCard,
    /// The training recipe, when the file is one of our training checkpoints.
    pub recipe: Option<Recipe>,
    /// The int8 calibration, when `resnet quantize` wrote the file.
    pub calibration: Option<crate::infer::quantize::Calibration>,
}

/// Open any weights file we read (a training checkpoint, our safetensors, a torchvision `.pth`, or a
/// `torchvision:` name or URL, fetched into the cache) for inference: its network, or with `Variant::Ema` a
/// checkpoint's weight EMA. The architecture is read off the keys; `arch`, when given, must agree, and a
/// mismatch names what the file holds.
pub fn open_model(spec: &Path, arch: Option<Arch>, variant: Variant) -> Result<Opened> {
    let path = &weights::hub::locate(spec)?;
    let (state, meta) = weights::read(path, variant)?;
    let found = Arch::infer_from(&state).map_err(|e| e.in_file(path))?;
    if let Some(want) = arch
        && want != found
    {
        return Err(Error::file(
            path,
            format!("holds a {found}, not a {want} (--arch can be left out: it is read off the file)"),
        ));
    }
    let model = weights::model_from_state(found, &state, path)?;
    let recipe = match meta.get("recipe") {
        Some(text) if matches!(meta.get("format").map(String::as_str), Some(FORMAT | QUANTIZED_FORMAT)) => {
            Some(Recipe::parse(text).map_err(|e| e.in_file(path))?)
        }
        _ => None,
    };
    let card = match ModelCard::from_metadata(&meta).map_err(|e| e.in_file(path))? {
        Some(card) => card,
        None => match &recipe {
            Some(r) => super::setup::card(r, None),
            None => {
                // A torchvision file: its published transforms when its name says which weights it holds.
                let mut preprocess = Preprocess::imagenet().for_channels(model.config.in_channels);
                if let Some(p) = weights::hub::Published::by_file_name(path) {
                    preprocess.resize = p.resize;
                }
                ModelCard { arch: found, stem: model.config.stem, classes: None, preprocess }
            }
        },
    };
    if card.arch != found || card.stem != model.config.stem {
        return Err(Error::file(
            path,
            format!(
                "metadata describes a {} ({} stem) but the weights hold a {found} ({} stem)",
                card.arch, card.stem, model.config.stem
            ),
        ));
    }
    if card.preprocess.channels != model.config.in_channels {
        return Err(Error::file(
            path,
            format!(
                "metadata preprocesses {} channels but the network's stem takes {}",
                card.preprocess.channels, model.config.in_channels
            ),
        ));
    }
    if let Some(names) = card.classes.as_ref().filter(|n| n.len() != model.config.num_classes) {
        return Err(Error::file(
            path,
            format!("metadata names {} classes but the network has {}", names.len(), model.config.num_classes),
        ));
    }
    let calibration = crate::infer::quantize::Calibration::from_metadata(&meta, path)?;
    Ok(Opened { model, card, recipe, calibration })
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
    let (mut model, mut optimizer, mut ema) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for (k, v) in loaded.tensors {
        if let Some(rest) = k.strip_prefix(OPTIMIZER_PREFIX) {
            optimizer.insert(rest.to_string(), v);
        } else if let Some(rest) = k.strip_prefix(EMA_PREFIX) {
            ema.insert(rest.to_string(), v);
        } else {
            model.insert(k, v);
        }
    }
    let ema = match loaded.metadata.get(AVERAGED_KEY) {
        Some(n) => Some((ema, n.parse().map_err(|_| Error::file(path, format!("bad {AVERAGED_KEY} metadata")))?)),
        None if ema.is_empty() => None,
        None => return Err(Error::file(path, format!("has a weight EMA but no {AVERAGED_KEY} metadata"))),
    };
    Ok(Checkpoint { recipe, position, model, optimizer, optimizer_steps, ema })
}
