//! What `resnet train --data PATH` does when no recipe is named: recognise the dataset in the folder, and for
//! a user's ImageFolder adapt the bundled `folder` recipe to the images found and to `--weights`.
//!
//! The choices, printed at start (`Recipe::summary`) and documented in the README:
//! - from scratch, images whose median shorter side is at most 64 px: the CIFAR stem at that size (a 28x28
//!   image trains at 28, resized only when its size differs), random crop with 1/8 padding and flips;
//! - from scratch, larger images: the ImageNet stem at 224 px (or the median shorter side rounded down to a
//!   multiple of 32, at least 96), evaluation at `size·8/7` then a centre crop, RandomResizedCrop + flips;
//! - with `--weights`: the network's own arch, stem and preprocessing (its model card; torchvision's 224/256
//!   and ImageNet mean/std for a file without one), SGD at lr 0.01 (for batch 64), weight decay 1e-4, 10 epochs.

use std::path::Path;

use super::checkpoint;
use super::recipe::{DatasetKind, Recipe};
use crate::data::folder::ImageFolder;
use crate::error::{Error, Result};
use crate::infer::preprocess::image_header;
use crate::model::Stem;

/// The dataset a folder holds: CIFAR binary batches (or their unpacked parent), else ImageFolder class
/// sub-folders (`root/<class>/` or `root/train/<class>/` + `root/val/<class>/`).
pub fn detect(path: &Path) -> Result<DatasetKind> {
    if !path.is_dir() {
        return Err(Error::file(path, "no such folder (--data takes a dataset folder)"));
    }
    let has = |rel: &str| path.join(rel).exists();
    if has("data_batch_1.bin") || has("cifar-10-batches-bin") {
        return Ok(DatasetKind::Cifar10);
    }
    if has("train.bin") || has("cifar-100-binary") {
        return Ok(DatasetKind::Cifar100);
    }
    if crate::data::idx::is_idx_folder(path) {
        return Ok(DatasetKind::Idx);
    }
    let sub_folders = std::fs::read_dir(path)
        .map_err(|e| Error::file(path, format!("cannot list folder: {e}")))?
        .flatten()
        .any(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'));
    if sub_folders {
        return Ok(DatasetKind::Folder);
    }
    Err(Error::file(
        path,
        "not a dataset folder: expected class sub-folders of images (root/<class>/*.jpg|png) or CIFAR binary batches",
    ))
}

/// The bundled recipe a dataset of `kind` starts from when no recipe is named: `folder` for an ImageFolder,
/// `cifar10` for CIFAR-10 and CIFAR-100, `fashion-mnist` for IDX files, `digits` for the digits.
pub fn recipe_for(kind: DatasetKind) -> Result<Recipe> {
    Ok(match kind {
        DatasetKind::Folder => Recipe::load("folder")?,
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => Recipe { dataset: kind, ..Recipe::load("cifar10")? },
        DatasetKind::Digits => Recipe::load("digits")?,
        DatasetKind::Idx => Recipe::load("fashion-mnist")?,
    })
}

/// The median shorter side of (up to 256, evenly spaced) images of the folder's training part.
pub fn median_short_side(root: &Path) -> Result<u32> {
    let train = root.join("train");
    let folder = ImageFolder::open(if train.is_dir() { &train } else { root })?;
    let samples = folder.samples();
    let step = samples.len().div_ceil(256).max(1);
    let mut sides = samples
        .iter()
        .step_by(step)
        .map(|(p, _)| image_header(p).map(|(w, h)| w.min(h)))
        .collect::<Result<Vec<u32>>>()?;
    sides.sort_unstable();
    Ok(sides.get(sides.len() / 2).copied().unwrap_or(32))
}

/// Fit the from-scratch folder recipe to images whose median shorter side is `short`.
pub fn adapt_to_images(r: &mut Recipe, short: u32) {
    if short <= 64 {
        r.stem = Stem::Cifar;
        r.image_size = short.max(8);
        r.eval_resize = r.image_size;
        r.random_resized_crop = false;
        r.crop_padding = (r.image_size / 8).max(1);
    } else {
        r.stem = Stem::ImageNet;
        r.image_size = if short >= 224 { 224 } else { (short / 32 * 32).max(96) };
        r.eval_resize = 0;
        r.random_resized_crop = true;
        r.crop_padding = 0;
    }
}

/// Take arch, stem and preprocessing from the checkpoint a run fine-tunes; with `folder_defaults` also the
/// fine-tuning schedule (a user's folder with no recipe named).
pub fn adapt_to_weights(r: &mut Recipe, weights: &Path, folder_defaults: bool) -> Result<()> {
    let opened = checkpoint::open_model(weights, None, checkpoint::Variant::Live)?;
    let card = opened.card;
    r.arch = card.arch;
    r.stem = card.stem;
    if !folder_defaults {
        return Ok(());
    }
    let pre = &card.preprocess;
    r.image_size = pre.size;
    r.eval_resize = pre.resize;
    r.in_channels = pre.channels;
    r.mean = pre.mean.clone();
    r.std = pre.std.clone();
    r.random_resized_crop = card.stem == Stem::ImageNet;
    r.crop_padding = if r.random_resized_crop { 0 } else { (pre.size / 8).max(1) };
    r.lr = 0.01;
    r.weight_decay = 1e-4;
    r.epochs = 10;
    r.warmup_epochs = 0;
    Ok(())
}
