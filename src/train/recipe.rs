//! Training recipes: TOML files (bundled ones by name, or a user's path), every field overridable by a flag.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Everything a run needs to be reproduced; stored in every checkpoint so `--resume` continues the same run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipe {
    pub arch: String,
    /// "imagenet" or "cifar".
    pub stem: String,
    pub zero_init_residual: bool,
    /// "digits", "cifar10", "cifar100" or "folder".
    pub dataset: String,
    /// Dataset location (CIFAR batches folder or ImageFolder root); unused for digits.
    pub data: Option<PathBuf>,
    /// Held-out fraction when the dataset has no separate validation split.
    pub val_fraction: f32,
    pub epochs: u64,
    pub batch_size: usize,
    /// "sgd", "adam" or "adamw".
    pub optimizer: String,
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
    /// No weight decay on BN weights and biases (1-d parameters).
    pub no_decay_bn_bias: bool,
    pub adam_betas: (f32, f32),
    pub adam_eps: f32,
    /// "constant", "step", "multistep", "cosine" or "onecycle".
    pub schedule: String,
    pub warmup_epochs: u64,
    pub warmup_start_factor: f32,
    pub min_lr: f32,
    pub step_size: u64,
    pub milestones: Vec<u64>,
    pub gamma: f32,
    /// Clip gradients to this global L2 norm; 0 disables.
    pub clip_grad_norm: f32,
    pub label_smoothing: f32,
    pub mixup_alpha: f32,
    pub cutmix_alpha: f32,
    /// Training input size (crop size); evaluation uses the same.
    pub image_size: u32,
    /// RandomCrop padding (0 disables random cropping).
    pub crop_padding: u32,
    pub hflip: bool,
    /// RandomResizedCrop to image_size instead of padding+crop (ImageNet style); eval then resizes to
    /// image_size·8/7 and centre-crops.
    pub random_resized_crop: bool,
    pub color_jitter: f32,
    pub random_erasing: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub seed: u64,
    pub workers: usize,
    /// Write gradient statistics every this many steps (0 disables).
    pub monitor_every: u64,
    /// Also checkpoint every this many steps (0: at the end of each epoch only).
    pub checkpoint_every: u64,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            arch: "resnet34".into(),
            stem: "cifar".into(),
            zero_init_residual: false,
            dataset: "digits".into(),
            data: None,
            val_fraction: 0.2,
            epochs: 10,
            batch_size: 64,
            optimizer: "sgd".into(),
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            no_decay_bn_bias: false,
            adam_betas: (0.9, 0.999),
            adam_eps: 1e-8,
            schedule: "cosine".into(),
            warmup_epochs: 0,
            warmup_start_factor: 0.1,
            min_lr: 0.0,
            step_size: 30,
            milestones: Vec::new(),
            gamma: 0.1,
            clip_grad_norm: 0.0,
            label_smoothing: 0.0,
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            image_size: 32,
            crop_padding: 4,
            hflip: true,
            random_resized_crop: false,
            color_jitter: 0.0,
            random_erasing: 0.0,
            mean: [0.4914, 0.4822, 0.4465],
            std: [0.2470, 0.2435, 0.2616],
            seed: 0,
            workers: 2,
            monitor_every: 50,
            checkpoint_every: 0,
        }
    }
}

/// The recipes that ship with the binary.
pub const BUNDLED: [(&str, &str); 3] = [
    ("digits", include_str!("../../recipes/digits.toml")),
    ("cifar10", include_str!("../../recipes/cifar10.toml")),
    ("imagenet", include_str!("../../recipes/imagenet.toml")),
];

impl Recipe {
    /// A bundled recipe by name, or a TOML file.
    pub fn load(name_or_path: &str) -> Result<Recipe> {
        if let Some((_, text)) = BUNDLED.iter().find(|(n, _)| *n == name_or_path) {
            return Recipe::parse(text).map_err(|e| Error::invalid(format!("bundled recipe {name_or_path}: {e}")));
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            let names: Vec<_> = BUNDLED.iter().map(|(n, _)| *n).collect();
            return Err(Error::file(path, format!("no such recipe file (bundled recipes: {})", names.join(", "))));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Recipe::parse(&text).map_err(|e| e.in_file(path))
    }

    pub fn parse(text: &str) -> Result<Recipe> {
        toml::from_str(text).map_err(|e| Error::invalid(format!("invalid recipe: {}", e.message())))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}
