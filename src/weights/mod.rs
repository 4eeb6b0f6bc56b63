//! Weights in and out: torchvision `.pth` state_dicts, `.safetensors` files, and our checkpoints (safetensors
//! with torchvision's key names, so they load back into PyTorch with `load_state_dict`).

pub mod adapt;
pub mod hub;
pub mod pth;
pub mod safetensors;

use std::collections::BTreeMap;
use std::path::Path;

use crate::engine::Tensor;
use crate::error::{Error, Result};
use crate::model::summary::summarize;
use crate::model::{Arch, ResNet, ResNetConfig};

pub use crate::files::{remove_stale_temporaries, write_atomic};

/// The key prefix under which a training checkpoint keeps the optimiser's state beside the model's tensors.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

/// The key prefix under which a training checkpoint keeps its weight EMA (`--model-ema`): a whole torchvision
/// state_dict (torchvision's checkpoints call it `model_ema`).
pub const EMA_PREFIX: &str = "model_ema.";

/// Which network of a file to read: the one the optimiser moved, or a training checkpoint's weight EMA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    #[default]
    Live,
    Ema,
}

/// Read a state_dict from a `.pth` (torch.save zip) or `.safetensors` file, told apart by content, not name, or
/// from the verified download a `torchvision:` name or URL stands for (`hub::locate`). A training checkpoint's
/// optimiser state (`optimizer.*`) and weight EMA (`model_ema.*`) are left out: only the network is returned.
pub fn load_state_dict(spec: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(read(&hub::locate(spec)?, Variant::Live)?.0)
}

/// The `variant` network's state_dict and the file's metadata (a safetensors header's `__metadata__`; none for
/// a `.pth`).
pub fn read(path: &Path, variant: Variant) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    let (tensors, metadata) = if bytes.starts_with(b"PK\x03\x04") {
        (pth::load_pth_bytes(&bytes, path)?, BTreeMap::new())
    } else if bytes.len() >= 8 && bytes.get(8) == Some(&b'{') {
        let loaded = safetensors::load_bytes(&bytes, path)?;
        (loaded.tensors, loaded.metadata)
    } else {
        return Err(Error::file(path, "neither a PyTorch .pth (zip) nor a .safetensors file"));
    };
    let network: BTreeMap<String, Tensor> = match variant {
        Variant::Live => tensors
            .into_iter()
            .filter(|(k, _)| !k.starts_with(OPTIMIZER_PREFIX) && !k.starts_with(EMA_PREFIX))
            .collect(),
        Variant::Ema => {
            tensors.into_iter().filter_map(|(k, v)| Some((k.strip_prefix(EMA_PREFIX)?.to_string(), v))).collect()
        }
    };
    if variant == Variant::Ema && network.is_empty() {
        return Err(Error::file(path, "holds no weight EMA (--ema needs a checkpoint trained with --model-ema)"));
    }
    Ok((network, metadata))
}

/// Build `arch` with the classes, stem and widths the file's shapes imply, and load its weights strictly.
pub fn load_model(arch: Arch, path: &Path) -> Result<ResNet> {
    model_from_state(arch, &load_state_dict(path)?, path)
}

/// `load_model` for a state_dict already read from `path` (a training checkpoint's, say).
pub fn model_from_state(arch: Arch, state: &BTreeMap<String, Tensor>, path: &Path) -> Result<ResNet> {
    let mut model = ResNet::new(config_from_state(arch, state, path)?, 0);
    model.load_state_dict(state).map_err(|e| e.in_file(path))?;
    Ok(model)
}

/// The configuration (classes, stem, widths) that `state`'s shapes imply for `arch`. Shapes come from the file:
/// a network the file cannot possibly fill is refused before it is allocated (a hostile header can claim huge
/// widths with empty tensors).
pub fn config_from_state(arch: Arch, state: &BTreeMap<String, Tensor>, path: &Path) -> Result<ResNetConfig> {
    let config = ResNetConfig::infer_from(arch, state).map_err(|e| e.in_file(path))?;
    let needed = summarize(&config, 224).params;
    let present: usize = state.values().map(Tensor::numel).sum();
    if needed > present {
        return Err(Error::file(
            path,
            format!(
                "{arch} with the widths and classes these shapes imply needs {needed} parameters, the file holds {present} values"
            ),
        ));
    }
    Ok(config)
}

/// Save the network's state_dict as safetensors under torchvision's keys, `num_batches_tracked` included.
pub fn save_model(model: &ResNet, path: &Path, metadata: &BTreeMap<String, String>) -> Result<()> {
    safetensors::save(path, &model.state_dict(), &batch_counts(model), metadata)
}

/// One `<bn>.num_batches_tracked` per BN layer, as torchvision's state_dict has them (an i64 scalar each).
pub fn batch_counts(model: &ResNet) -> BTreeMap<String, i64> {
    model
        .batch_norm_names()
        .into_iter()
        .map(|bn| (format!("{bn}.num_batches_tracked"), model.store.batches_tracked))
        .collect()
}
