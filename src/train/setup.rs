//! What a run is built from: datasets, preprocessing, optimiser, schedule and network, all read off the recipe.

use std::path::Path;
use std::sync::Arc;

use super::optim::OptimizerKind;
use super::recipe::{DatasetKind, OptimizerName, Recipe, ScheduleName, Stage};
use super::schedule::Schedule;
use crate::data::Dataset;
use crate::data::transforms::{Op, Pipeline, RandomErasing};
use crate::error::{Error, Result};
use crate::infer::card::{ModelCard, Preprocess};
use crate::model::{Arch, ResNet, ResNetConfig};
use crate::weights::adapt::adapt_input_conv;

/// Train and validation sets as the recipe names them.
pub fn datasets(r: &Recipe) -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>)> {
    use crate::data::cifar::{Cifar, CifarKind};
    use crate::data::folder::ImageFolder;
    let need_path =
        || r.data.clone().ok_or_else(|| Error::invalid(format!("dataset '{}' needs --data PATH", r.dataset)));
    match r.dataset {
        DatasetKind::Digits => Ok(crate::data::digits::Digits::load()?.split(r.val_fraction, r.seed)),
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            let kind = if r.dataset == DatasetKind::Cifar10 { CifarKind::Cifar10 } else { CifarKind::Cifar100 };
            let dir = need_path()?;
            Ok((Arc::new(Cifar::open(&dir, kind, true)?), Arc::new(Cifar::open(&dir, kind, false)?)))
        }
        DatasetKind::Idx => {
            let (train, test) = crate::data::idx::Idx::open(&need_path()?)?;
            Ok((Arc::new(train), Arc::new(test)))
        }
        DatasetKind::Folder => {
            let root = need_path()?;
            let how = preprocess(r).decode();
            match ImageFolder::open_train_val(&root, how)? {
                Some(pair) => Ok(pair),
                None => {
                    let folder = ImageFolder::open(&root)?.with_decode(how);
                    folder.scan()?;
                    Ok(folder.split(r.val_fraction, r.seed))
                }
            }
        }
    }
}

/// Refuse data that cannot train a classifier, in one line, before a run folder exists: fewer than two
/// classes, an empty training set, an empty validation split.
pub fn check_datasets(r: &Recipe, train: &dyn Dataset, val: &dyn Dataset) -> Result<()> {
    let place = r.data.as_ref().map_or_else(|| r.dataset.to_string(), |d| d.display().to_string());
    if train.num_classes() < 2 {
        return Err(Error::invalid(format!(
            "{place}: a classifier needs at least two classes, this dataset has {} ({})",
            train.num_classes(),
            train.class_names().join(", ")
        )));
    }
    if train.is_empty() {
        return Err(Error::invalid(format!("{place}: the training set is empty")));
    }
    if val.is_empty() {
        return Err(Error::invalid(format!(
            "{place}: the validation split is empty ({} training images, --val-fraction {} holds out none); add images, raise --val-fraction or give root/train/ and root/val/",
            train.len(),
            r.val_fraction
        )));
    }
    Ok(())
}

/// The recipe's `pixel_scale`, 0 meaning each type's maximum.
fn pixel_scale(r: &Recipe) -> Option<f32> {
    (r.pixel_scale > 0.0).then_some(r.pixel_scale)
}

/// The evaluation preprocessing a recipe trains for: what its checkpoints carry and `eval` runs.
pub fn preprocess(r: &Recipe) -> Preprocess {
    Preprocess {
        channels: r.in_channels,
        pixel_scale: pixel_scale(r),
        window: <[f32; 2]>::try_from(r.window.as_slice()).ok(),
        size: r.image_size,
        resize: r.eval_resize(),
        mean: r.mean.clone(),
        std: r.std.clone(),
    }
}

/// The model card of a network trained with `r` on classes named `classes`.
pub fn card(r: &Recipe, classes: Option<Vec<String>>) -> ModelCard {
    ModelCard { arch: r.arch, stem: r.stem, classes, preprocess: preprocess(r) }
}

/// Training and evaluation preprocessing from the recipe.
pub fn pipelines(r: &Recipe) -> (Pipeline, Pipeline) {
    let size = r.image_size;
    let mut train = Vec::new();
    if r.random_resized_crop {
        train.push(Op::RandomResizedCrop { size, scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0) });
    } else {
        if r.dataset == DatasetKind::Folder {
            // A folder's images have any size: bring them to the evaluation crop first.
            train.extend([Op::Resize { shorter: r.eval_resize() }, Op::CenterCrop { size }]);
        }
        if r.crop_padding > 0 {
            train.push(Op::RandomCrop { size, padding: r.crop_padding });
        }
    }
    if r.hflip {
        train.push(Op::HorizontalFlip { p: 0.5 });
    }
    if r.color_jitter > 0.0 {
        let j = r.color_jitter;
        train.push(Op::ColorJitter { brightness: j, contrast: j, saturation: j, hue: 0.0 });
    }
    let erasing = (r.random_erasing > 0.0).then_some(RandomErasing {
        p: r.random_erasing,
        scale: (0.02, 0.33),
        ratio: (0.3, 3.3),
    });
    let train = Pipeline { ops: train, channels: r.in_channels, mean: r.mean.clone(), std: r.std.clone(), erasing };
    (train, preprocess(r).pipeline())
}

pub fn optimizer_kind(r: &Recipe) -> OptimizerKind {
    let (beta1, beta2) = r.adam_betas;
    match r.optimizer {
        OptimizerName::Sgd => OptimizerKind::Sgd { momentum: r.momentum, nesterov: r.nesterov },
        OptimizerName::Adam => OptimizerKind::Adam { beta1, beta2, eps: r.adam_eps },
        OptimizerName::Adamw => OptimizerKind::AdamW { beta1, beta2, eps: r.adam_eps },
    }
}

pub fn schedule(r: &Recipe) -> Schedule {
    match r.schedule {
        ScheduleName::Constant => Schedule::Constant,
        ScheduleName::Step => Schedule::Step { step_size: r.step_size.max(1), gamma: r.gamma },
        ScheduleName::Multistep => Schedule::MultiStep { milestones: r.milestones.clone(), gamma: r.gamma },
        ScheduleName::Cosine => Schedule::Cosine {
            warmup_epochs: r.warmup_epochs,
            warmup_start_factor: r.warmup_start_factor,
            min_lr: r.min_lr,
        },
        ScheduleName::Onecycle => Schedule::OneCycle {
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            max_momentum: 0.95,
            base_momentum: 0.85,
        },
    }
}

/// The network to train: fresh from the recipe, or a checkpoint with its head replaced for `classes`. A
/// checkpoint must hold the recipe's arch and stem (`resnet train` takes both from `--weights` unless told).
pub fn build_model(r: &Recipe, classes: usize, init: Option<&Path>) -> Result<ResNet> {
    let Some(path) = init else {
        let config = ResNetConfig {
            stem: r.stem,
            in_channels: r.in_channels,
            zero_init_residual: r.zero_init_residual,
            ..ResNetConfig::new(r.arch, classes)
        };
        return Ok(ResNet::new(config, r.seed));
    };
    let mut state = crate::weights::load_state_dict(path)?;
    let arch = Arch::infer_from(&state).map_err(|e| e.in_file(path))?;
    let found = crate::weights::config_from_state(arch, &state, path)?;
    if (arch, found.stem) != (r.arch, r.stem) {
        return Err(Error::file(
            path,
            format!(
                "holds a {arch} with the {} stem, not the {} with the {} stem asked for",
                found.stem, r.arch, r.stem
            ),
        ));
    }
    if found.in_channels != r.in_channels {
        let stem = state.get("conv1.weight").ok_or_else(|| Error::file(path, "missing key 'conv1.weight'"))?;
        let adapted = adapt_input_conv(stem, r.in_channels).map_err(|e| e.in_file(path))?;
        eprintln!(
            "{}: conv1 adapted from {} to {} input channels as timm's adapt_input_conv does ({})",
            path.display(),
            found.in_channels,
            r.in_channels,
            if r.in_channels == 1 { "filters summed over RGB" } else { "RGB filters repeated, scaled by 3/N" }
        );
        state.insert("conv1.weight".to_string(), adapted);
    }
    let config = ResNetConfig { num_classes: classes, in_channels: r.in_channels, ..found };
    let mut model = ResNet::new(config, r.seed);
    if found.num_classes != classes {
        // A new head for the new classes keeps its fresh initialisation.
        let fresh = model.state_dict();
        for key in ["fc.weight", "fc.bias"] {
            state.insert(key.to_string(), fresh[key].clone());
        }
    }
    model.load_state_dict(&state).map_err(|e| e.in_file(path))?;
    Ok(model)
}

/// The parameter-name prefixes `--freeze-until until` freezes: the stem and every stage up to `until`.
pub fn freeze_prefixes(until: Stage) -> Vec<&'static str> {
    const ORDER: [(Stage, &[&str]); 5] = [
        (Stage::Stem, &["conv1.", "bn1."]),
        (Stage::Layer1, &["layer1."]),
        (Stage::Layer2, &["layer2."]),
        (Stage::Layer3, &["layer3."]),
        (Stage::Layer4, &["layer4."]),
    ];
    ORDER
        .iter()
        .take_while(|(s, _)| *s != until)
        .chain(ORDER.iter().filter(|(s, _)| *s == until))
        .flat_map(|(_, p)| p.iter().copied())
        .collect()
}
