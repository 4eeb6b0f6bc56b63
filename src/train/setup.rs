//! What a run is built from: datasets, preprocessing, optimiser, schedule and network, all read off the recipe.

use std::path::Path;
use std::sync::Arc;

use super::optim::OptimizerKind;
use super::recipe::Recipe;
use super::schedule::Schedule;
use crate::data::Dataset;
use crate::data::transforms::{Op, Pipeline, RandomErasing};
use crate::error::{Error, Result};
use crate::model::{ResNet, ResNetConfig};

/// Train and validation sets as the recipe names them.
pub fn datasets(r: &Recipe) -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>)> {
    use crate::data::cifar::{Cifar, CifarKind};
    use crate::data::folder::ImageFolder;
    let need_path =
        || r.data.clone().ok_or_else(|| Error::invalid(format!("dataset '{}' needs --data PATH", r.dataset)));
    match r.dataset.as_str() {
        "digits" => Ok(crate::data::digits::Digits::load()?.split(r.val_fraction, r.seed)),
        "cifar10" | "cifar100" => {
            let kind = if r.dataset == "cifar10" { CifarKind::Cifar10 } else { CifarKind::Cifar100 };
            let dir = need_path()?;
            Ok((Arc::new(Cifar::open(&dir, kind, true)?), Arc::new(Cifar::open(&dir, kind, false)?)))
        }
        "folder" => {
            let root = need_path()?;
            match ImageFolder::open_train_val(&root)? {
                Some(pair) => Ok(pair),
                None => Ok(ImageFolder::open(&root)?.split(r.val_fraction, r.seed)),
            }
        }
        other => {
            Err(Error::invalid(format!("unknown dataset '{other}' (expected digits, cifar10, cifar100 or folder)")))
        }
    }
}

/// Training and evaluation preprocessing from the recipe.
pub fn pipelines(r: &Recipe) -> (Pipeline, Pipeline) {
    let size = r.image_size;
    let resize_crop = vec![Op::Resize { shorter: size * 8 / 7 }, Op::CenterCrop { size }];
    let fixed_size = r.dataset == "folder";
    let mut train = Vec::new();
    if r.random_resized_crop {
        train.push(Op::RandomResizedCrop { size, scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0) });
    } else {
        if fixed_size {
            train.extend(resize_crop.iter().cloned());
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
    let eval_ops = if fixed_size || r.random_resized_crop { resize_crop } else { Vec::new() };
    (
        Pipeline { ops: train, mean: r.mean, std: r.std, erasing },
        Pipeline { ops: eval_ops, mean: r.mean, std: r.std, erasing: None },
    )
}

pub fn optimizer_kind(r: &Recipe) -> Result<OptimizerKind> {
    let (beta1, beta2) = r.adam_betas;
    Ok(match r.optimizer.as_str() {
        "sgd" => OptimizerKind::Sgd { momentum: r.momentum, nesterov: r.nesterov },
        "adam" => OptimizerKind::Adam { beta1, beta2, eps: r.adam_eps },
        "adamw" => OptimizerKind::AdamW { beta1, beta2, eps: r.adam_eps },
        other => return Err(Error::invalid(format!("unknown optimizer '{other}' (expected sgd, adam or adamw)"))),
    })
}

pub fn schedule(r: &Recipe) -> Result<Schedule> {
    Ok(match r.schedule.as_str() {
        "constant" => Schedule::Constant,
        "step" => Schedule::Step { step_size: r.step_size.max(1), gamma: r.gamma },
        "multistep" => Schedule::MultiStep { milestones: r.milestones.clone(), gamma: r.gamma },
        "cosine" => Schedule::Cosine {
            warmup_epochs: r.warmup_epochs,
            warmup_start_factor: r.warmup_start_factor,
            min_lr: r.min_lr,
        },
        "onecycle" => Schedule::OneCycle {
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            max_momentum: 0.95,
            base_momentum: 0.85,
        },
        other => {
            return Err(Error::invalid(format!(
                "unknown schedule '{other}' (expected constant, step, multistep, cosine or onecycle)"
            )));
        }
    })
}

/// The network to train: fresh from the recipe, or a checkpoint with its head replaced for `classes`.
pub fn build_model(r: &Recipe, classes: usize, init: Option<&Path>) -> Result<ResNet> {
    let arch = r.arch.parse()?;
    let Some(path) = init else {
        let config = ResNetConfig {
            stem: r.stem.parse()?,
            zero_init_residual: r.zero_init_residual,
            ..ResNetConfig::new(arch, classes)
        };
        return Ok(ResNet::new(config, r.seed));
    };
    let mut state = crate::weights::load_state_dict(path)?;
    let found = crate::weights::config_from_state(arch, &state, path)?;
    let config = ResNetConfig { num_classes: classes, ..found };
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

pub fn freeze_prefixes(until: &str) -> Result<Vec<&'static str>> {
    const ORDER: [(&str, &[&str]); 5] = [
        ("stem", &["conv1.", "bn1."]),
        ("layer1", &["layer1."]),
        ("layer2", &["layer2."]),
        ("layer3", &["layer3."]),
        ("layer4", &["layer4."]),
    ];
    let last = ORDER
        .iter()
        .position(|(n, _)| *n == until)
        .ok_or_else(|| Error::invalid(format!("unknown --freeze-until '{until}' (expected stem or layer1..layer4)")))?;
    Ok(ORDER[..=last].iter().flat_map(|(_, p)| p.iter().copied()).collect())
}
