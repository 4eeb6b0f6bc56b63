//! Training recipes: TOML files (bundled ones by name, or a user's path) whose every field is also a
//! `resnet train` flag. Both come from the one field table in `recipe_fields!` below: the struct (with its
//! serde names and defaults), the flag (`--field-name`, its help text from the field's doc comment, and a
//! typed parser that lists the allowed values of an enum), and the code that lays flags over a recipe. A
//! field added to the table is a flag without another line; `tests/cli.rs` checks that every field shows
//! in `--help`. Recipes stored in older checkpoints still load: new fields take their defaults.

use std::path::{Path, PathBuf};

use clap::builder::{PossibleValuesParser, TypedValueParser, ValueParser};
use clap::{Arg, ArgAction, ArgMatches};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Arch, Stem};

named_enum! {
    /// Which dataset a recipe trains on.
    pub enum DatasetKind ("dataset") {
        /// scikit-learn's 8x8 digits, bundled in the binary.
        Digits = "digits",
        Cifar10 = "cifar10",
        Cifar100 = "cifar100",
        /// torchvision's ImageFolder: `root/<class>/<image>` (or `root/train/..` + `root/val/..`).
        Folder = "folder",
        /// IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST): a train and a test pair in one folder.
        Idx = "idx",
    }
}

named_enum! {
    pub enum OptimizerName ("optimizer") {
        Sgd = "sgd",
        Adam = "adam",
        Adamw = "adamw",
    }
}

named_enum! {
    pub enum ScheduleName ("schedule") {
        Constant = "constant",
        Step = "step",
        Multistep = "multistep",
        Cosine = "cosine",
        Onecycle = "onecycle",
    }
}

named_enum! {
    /// The last part of the network `--freeze-until` freezes (everything before it too).
    pub enum Stage ("stage") {
        Stem = "stem",
        Layer1 = "layer1",
        Layer2 = "layer2",
        Layer3 = "layer3",
        Layer4 = "layer4",
    }
}

/// How a recipe field's type reads from a flag: the placeholder shown in `--help` and a typed parser whose
/// error names the flag, the value and what was expected.
pub trait FlagValue: Clone + Send + Sync + 'static {
    const VALUE_NAME: &'static str;
    fn parser() -> ValueParser;
    /// Adjust the argument (a bool flag alone means true).
    fn tune(arg: Arg) -> Arg {
        arg
    }
}

fn from_names<T>(names: Vec<&'static str>) -> ValueParser
where
    T: std::str::FromStr<Err = Error> + Clone + Send + Sync + 'static,
{
    ValueParser::new(PossibleValuesParser::new(names).try_map(|s| s.parse::<T>().map_err(|e| e.to_string())))
}

/// `a,b,c` into numbers.
fn number_list<T: std::str::FromStr>(s: &str) -> std::result::Result<Vec<T>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse::<T>().map_err(|_| format!("'{p}' is not a number")))
        .collect()
}

macro_rules! flag_numbers {
    ($($t:ty => $name:literal),*) => {$(
        impl FlagValue for $t {
            const VALUE_NAME: &'static str = $name;
            fn parser() -> ValueParser {
                ValueParser::new(|s: &str| s.trim().parse::<$t>().map_err(|_| format!("'{s}' is not a {}", $name)))
            }
        }
    )*};
}
flag_numbers!(f32 => "NUMBER", f64 => "NUMBER", u32 => "N", u64 => "N", usize => "N");

impl FlagValue for bool {
    const VALUE_NAME: &'static str = "true|false";
    fn parser() -> ValueParser {
        ValueParser::bool()
    }
    fn tune(arg: Arg) -> Arg {
        arg.num_args(0..=1).default_missing_value("true")
    }
}

impl FlagValue for Option<PathBuf> {
    const VALUE_NAME: &'static str = "PATH";
    fn parser() -> ValueParser {
        ValueParser::new(clap::builder::PathBufValueParser::new().map(Some))
    }
}

impl FlagValue for Vec<u64> {
    const VALUE_NAME: &'static str = "N,N,..";
    fn parser() -> ValueParser {
        ValueParser::new(number_list::<u64>)
    }
}

impl FlagValue for (f32, f32) {
    const VALUE_NAME: &'static str = "A,B";
    fn parser() -> ValueParser {
        ValueParser::new(|s: &str| match number_list::<f32>(s)?[..] {
            [a, b] => Ok((a, b)),
            _ => Err(format!("'{s}' is not two comma-separated numbers")),
        })
    }
}

impl FlagValue for Vec<f32> {
    const VALUE_NAME: &'static str = "V[,V..]";
    fn parser() -> ValueParser {
        ValueParser::new(|s: &str| match number_list::<f32>(s)? {
            v if !v.is_empty() => Ok(v),
            _ => Err(format!("'{s}' is not comma-separated numbers (one, or one per channel)")),
        })
    }
}

impl FlagValue for Arch {
    const VALUE_NAME: &'static str = "ARCH";
    fn parser() -> ValueParser {
        from_names::<Arch>(Arch::names())
    }
}

impl FlagValue for Stem {
    const VALUE_NAME: &'static str = "STEM";
    fn parser() -> ValueParser {
        from_names::<Stem>(vec!["imagenet", "cifar"])
    }
}

macro_rules! flag_named {
    ($($t:ty),*) => {$(
        impl FlagValue for $t {
            const VALUE_NAME: &'static str = "NAME";
            fn parser() -> ValueParser {
                from_names::<$t>(<$t>::NAMES.to_vec())
            }
        }
    )*};
}
flag_named!(DatasetKind, OptimizerName, ScheduleName);

impl FlagValue for Option<Stage> {
    const VALUE_NAME: &'static str = "STAGE";
    fn parser() -> ValueParser {
        ValueParser::new(
            PossibleValuesParser::new(Stage::NAMES)
                .try_map(|s| s.parse::<Stage>().map(Some).map_err(|e| e.to_string())),
        )
    }
}

/// The flag of a field: `batch_size` → `batch-size`.
fn flag_name(field: &str) -> String {
    field.replace('_', "-")
}

/// Older spellings still accepted on the command line.
const ALIASES: [(&str, &str); 2] = [("mixup_alpha", "mixup"), ("cutmix_alpha", "cutmix")];

macro_rules! recipe_fields {
    ($( $(#[doc = $doc:literal])+ $field:ident : $ty:ty = $default:expr, )+) => {
        /// Everything a run needs to be reproduced; stored in every checkpoint so `--resume` continues the same run.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Recipe {
            $( $(#[doc = $doc])+ pub $field: $ty, )+
        }

        impl Default for Recipe {
            fn default() -> Self {
                Recipe { $( $field: $default, )+ }
            }
        }

        /// The recipe fields given on the command line (each `None` when its flag was not).
        #[derive(Clone, Debug, Default)]
        pub struct RecipeFlags {
            $( pub $field: Option<$ty>, )+
        }

        /// Every recipe field's name, in table order.
        pub const FIELDS: &[&str] = &[$(stringify!($field)),+];

        impl RecipeFlags {
            /// Lay the given flags over `r`.
            pub fn apply(&self, r: &mut Recipe) {
                $( if let Some(v) = &self.$field { r.$field = v.clone(); } )+
            }

            /// The flags that were given, as `--flag-name`.
            pub fn given(&self) -> Vec<String> {
                let mut out = Vec::new();
                $( if self.$field.is_some() { out.push(format!("--{}", flag_name(stringify!($field)))); } )+
                out
            }
        }

        impl clap::FromArgMatches for RecipeFlags {
            fn from_arg_matches(m: &ArgMatches) -> std::result::Result<Self, clap::Error> {
                let get = |id: &str| clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, format!("internal: --{id} has the wrong type"));
                Ok(RecipeFlags {
                    $( $field: m.try_get_one::<$ty>(stringify!($field)).map_err(|_| get(stringify!($field)))?.cloned(), )+
                })
            }
            fn update_from_arg_matches(&mut self, m: &ArgMatches) -> std::result::Result<(), clap::Error> {
                *self = Self::from_arg_matches(m)?;
                Ok(())
            }
        }

        impl clap::Args for RecipeFlags {
            fn augment_args(cmd: clap::Command) -> clap::Command {
                let cmd = cmd.next_help_heading("Recipe fields (each overrides the recipe's value)");
                $(
                    let help = [$($doc),+].iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
                    let mut arg = Arg::new(stringify!($field))
                        .long(flag_name(stringify!($field)))
                        .value_name(<$ty as FlagValue>::VALUE_NAME)
                        .value_parser(<$ty as FlagValue>::parser())
                        .action(ArgAction::Set)
                        .help(help);
                    if let Some((_, alias)) = ALIASES.iter().find(|(f, _)| *f == stringify!($field)) {
                        arg = arg.visible_alias(*alias);
                    }
                    let cmd = cmd.arg(<$ty as FlagValue>::tune(arg));
                )+
                cmd
            }
            fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
                Self::augment_args(cmd)
            }
        }
    };
}

recipe_fields! {
    /// Network: resnet18, resnet34, resnet50, resnet101 or resnet152.
    arch: Arch = FAMILY_DEFAULT,
    /// imagenet (7x7/2 convolution + max-pool, for inputs of 96 px and more) or cifar (3x3/1, no pooling,
    /// for small inputs).
    stem: Stem = Stem::Cifar,
    /// Zero the last BN weight of every block, so each residual branch starts as the identity.
    zero_init_residual: bool = false,
    /// digits (bundled), cifar10, cifar100 (binary batches) or folder (ImageFolder); recognised from --data
    /// when no recipe is named.
    dataset: DatasetKind = DatasetKind::Digits,
    /// Dataset location: the CIFAR folder (or where to download it) or an ImageFolder root.
    data: Option<PathBuf> = None,
    /// Held-out fraction, per class, when the dataset has no separate validation split.
    val_fraction: f32 = 0.2,
    /// Passes over the training set; with --resume, extends (or shortens) a run to this many.
    epochs: u64 = 10,
    /// Images per step; changing it scales the recipe's lr linearly unless --lr is given.
    batch_size: usize = 64,
    /// Data-parallel runs: batch norm over the whole effective batch (PyTorch's SyncBatchNorm), its batch
    /// statistics and, in backward, its gradient sums added over the ranks at every BN layer; without it each
    /// rank normalises its own batch, as DDP does by default.
    sync_bn: bool = false,
    /// sgd, adam or adamw.
    optimizer: OptimizerName = OptimizerName::Sgd,
    /// Peak learning rate.
    lr: f32 = 0.1,
    /// SGD momentum (0 keeps no momentum buffer).
    momentum: f32 = 0.9,
    /// Nesterov momentum for SGD.
    nesterov: bool = false,
    /// L2 weight decay (decoupled for adamw).
    weight_decay: f32 = 5e-4,
    /// No weight decay on BN weights and biases (1-d parameters).
    no_decay_bn_bias: bool = false,
    /// Adam/AdamW beta1,beta2.
    adam_betas: (f32, f32) = (0.9, 0.999),
    /// Adam/AdamW epsilon.
    adam_eps: f32 = 1e-8,
    /// constant, step, multistep, cosine or onecycle.
    schedule: ScheduleName = ScheduleName::Cosine,
    /// Linear warm-up epochs of the cosine schedule.
    warmup_epochs: u64 = 0,
    /// Warm-up starts at this fraction of the lr.
    warmup_start_factor: f32 = 0.1,
    /// Floor of the cosine schedule.
    min_lr: f32 = 0.0,
    /// Epochs between lr drops of the step schedule.
    step_size: u64 = 30,
    /// Epochs at which the multistep schedule multiplies the lr by gamma.
    milestones: Vec<u64> = Vec::new(),
    /// Factor of each step/multistep lr drop.
    gamma: f32 = 0.1,
    /// Clip gradients to this global L2 norm; 0 disables.
    clip_grad_norm: f32 = 0.0,
    /// Label smoothing of the cross-entropy targets.
    label_smoothing: f32 = 0.0,
    /// MixUp alpha (0 disables).
    mixup_alpha: f32 = 0.0,
    /// CutMix alpha (0 disables).
    cutmix_alpha: f32 = 0.0,
    /// Network input side in pixels (training crop and evaluation crop).
    image_size: u32 = 32,
    /// Evaluation: shorter side before the centre crop (0: image_size for digits and CIFAR, whose images
    /// already have that size, else image_size·8/7, torchvision's 256 for 224).
    eval_resize: u32 = 0,
    /// RandomCrop padding (0 disables random cropping).
    crop_padding: u32 = 4,
    /// Random horizontal flips.
    hflip: bool = true,
    /// RandomResizedCrop to image_size instead of padding + crop (ImageNet style).
    random_resized_crop: bool = false,
    /// ColorJitter strength for brightness, contrast and saturation (0 disables).
    color_jitter: f32 = 0.0,
    /// RandomErasing probability (0 disables).
    random_erasing: f32 = 0.0,
    /// Integer pixel values are divided by this instead of their type's maximum (0: the type's maximum, 255
    /// for 8-bit, 65535 for 16-bit; Sentinel-2 reflectance: 10000). Floating-point pixels are divided by it too.
    pixel_scale: f32 = 0.0,
    /// DICOM window CENTER,WIDTH mapped to [0, 1] after the modality LUT (empty: each file's first VOI window,
    /// else its full range).
    window: Vec<f32> = Vec::new(),
    /// Image channels the network takes (3: RGB; 1: greyscale; N: multi-band). A grey image is replicated for
    /// an RGB network; a 3-channel --weights is adapted to N as timm's adapt_input_conv does.
    in_channels: usize = 3,
    /// Per-channel mean subtracted after scaling pixels to [0, 1] (one value, or one per channel).
    mean: Vec<f32> = vec![0.4914, 0.4822, 0.4465],
    /// Per-channel standard deviation the centred pixels are divided by (one value, or one per channel).
    std: Vec<f32> = vec![0.2470, 0.2435, 0.2616],
    /// Seed of the initialisation, the split, the shuffle and every augmentation.
    seed: u64 = 0,
    /// Data loader threads (results do not depend on it).
    workers: usize = 2,
    /// Write gradient statistics every this many steps (0 disables).
    monitor_every: u64 = 50,
    /// Also checkpoint every this many steps (0: at the end of each epoch only).
    checkpoint_every: u64 = 0,
    /// Fine-tune from this checkpoint (.pth or .safetensors, or a published name such as torchvision:resnet34,
    /// downloaded once); the head is replaced when the dataset's class count differs.
    weights: Option<PathBuf> = None,
    /// Freeze the stem and the stages up to this one (stem, layer1..layer4); needs --weights.
    freeze_until: Option<Stage> = None,
    /// Learning rate of the fc head relative to --lr.
    head_lr_scale: f32 = 1.0,
    /// Keep an exponential moving average of the weights and BN statistics, evaluated every epoch and saved in
    /// every checkpoint (`--ema` on eval/predict/features uses it), with this decay per update (0 disables;
    /// torchvision's reference script: its --model-ema-decay d becomes 1 - (1 - d)·batch·steps/epochs).
    model_ema: f64 = 0.0,
    /// Update the weight EMA after every this many steps of an epoch (torchvision's --model-ema-steps: 32).
    model_ema_steps: u64 = 1,
}

const FAMILY_DEFAULT: Arch = crate::model::FAMILY[1];

/// The recipes that ship with the binary.
pub const BUNDLED: [(&str, &str); 5] = [
    ("digits", include_str!("../../recipes/digits.toml")),
    ("cifar10", include_str!("../../recipes/cifar10.toml")),
    ("imagenet", include_str!("../../recipes/imagenet.toml")),
    ("folder", include_str!("../../recipes/folder.toml")),
    ("fashion-mnist", include_str!("../../recipes/fashion-mnist.toml")),
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

    /// Refuse values no run can use, naming the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, why: &str| Err(Error::invalid(format!("--{flag} {why}")));
        let finite = [
            ("lr", self.lr),
            ("momentum", self.momentum),
            ("weight-decay", self.weight_decay),
            ("head-lr-scale", self.head_lr_scale),
            ("label-smoothing", self.label_smoothing),
            ("clip-grad-norm", self.clip_grad_norm),
        ];
        if let Some((flag, _)) = finite.iter().find(|(_, v)| !v.is_finite() || *v < 0.0) {
            return bad(flag, "must be a finite number of at least 0");
        }
        if self.lr <= 0.0 {
            return bad("lr", "must be above 0");
        }
        if self.batch_size == 0 || self.epochs == 0 {
            return Err(Error::invalid("--batch-size and --epochs must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return bad("val-fraction", "must be at least 0 and below 1");
        }
        if !(8..=4096).contains(&self.image_size) {
            return bad("image-size", "must be between 8 and 4096 pixels");
        }
        if self.eval_resize > 16384 {
            return bad("eval-resize", "must be at most 16384 pixels (0: derived from --image-size)");
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) || self.mean.iter().any(|m| !m.is_finite()) {
            return bad("std", "and --mean must be finite, the std above 0");
        }
        if !self.pixel_scale.is_finite() || self.pixel_scale < 0.0 {
            return bad("pixel-scale", "must be a finite number above 0 (0: each type's maximum)");
        }
        if !(self.window.is_empty() || self.window.len() == 2 && self.window[1] >= 1.0)
            || self.window.iter().any(|v| !v.is_finite())
        {
            return bad("window", "takes CENTER,WIDTH with a width of at least 1");
        }
        if !(1..=crate::model::MAX_IN_CHANNELS).contains(&self.in_channels) {
            return bad("in-channels", &format!("must be between 1 and {}", crate::model::MAX_IN_CHANNELS));
        }
        for (flag, v) in [("mean", &self.mean), ("std", &self.std)] {
            if v.len() != 1 && v.len() != self.in_channels {
                return bad(
                    flag,
                    &format!(
                        "has {} values for {} channels: give one value, or one per channel",
                        v.len(),
                        self.in_channels
                    ),
                );
            }
        }
        if self.color_jitter > 0.0 && self.in_channels != 3 {
            return bad("color-jitter", &format!("needs RGB images (3 channels, not {})", self.in_channels));
        }
        if !(0.0..1.0).contains(&self.model_ema) {
            return bad("model-ema", "is a decay: at least 0 (off) and below 1");
        }
        if self.model_ema_steps == 0 {
            return bad("model-ema-steps", "must be at least 1");
        }
        if self.freeze_until.is_some() && self.weights.is_none() {
            return Err(Error::invalid(
                "--freeze-until freezes pretrained layers: it needs --weights (a random trunk would stay random)",
            ));
        }
        Ok(())
    }

    /// The shorter side evaluation resizes to before its centre crop (see `eval_resize`).
    pub fn eval_resize(&self) -> u32 {
        match (self.eval_resize, self.dataset, self.random_resized_crop) {
            (0, DatasetKind::Digits | DatasetKind::Cifar10 | DatasetKind::Cifar100 | DatasetKind::Idx, false) => {
                self.image_size
            }
            (0, _, _) => (u64::from(self.image_size) * 8 / 7).min(u64::from(u32::MAX)) as u32,
            (r, _, _) => r,
        }
    }
}

impl Recipe {
    /// The start-up line: what the run will train, on what, and how.
    pub fn summary(&self) -> String {
        let mut aug = Vec::new();
        if self.random_resized_crop {
            aug.push("RandomResizedCrop".to_string());
        } else if self.crop_padding > 0 {
            aug.push(format!("random crop (padding {})", self.crop_padding));
        }
        if self.hflip {
            aug.push("flips".into());
        }
        if self.color_jitter > 0.0 {
            aug.push(format!("colour jitter {}", self.color_jitter));
        }
        for (name, v) in
            [("mixup", self.mixup_alpha), ("cutmix", self.cutmix_alpha), ("random erasing", self.random_erasing)]
        {
            if v > 0.0 {
                aug.push(format!("{name} {v}"));
            }
        }
        let ema = if self.model_ema > 0.0 {
            format!(", weight EMA (decay {} every {} steps)", self.model_ema, self.model_ema_steps)
        } else {
            String::new()
        };
        let data = self.data.as_ref().map_or_else(String::new, |d| format!(" in {}", d.display()));
        let init = match (&self.weights, self.freeze_until) {
            (Some(w), Some(f)) => format!("fine-tuned from {} (frozen up to {f})", w.display()),
            (Some(w), None) => format!("fine-tuned from {}", w.display()),
            (None, _) => "from scratch".into(),
        };
        format!(
            "{} ({} stem) on {}{data}, {init}: input {}x{} (evaluation: shorter side {}, centre crop {}), {} lr {} batch {} weight decay {}, {} schedule, {} epochs, augmentation: {}{ema}",
            self.arch,
            self.stem,
            self.dataset,
            self.image_size,
            self.image_size,
            self.eval_resize(),
            self.image_size,
            self.optimizer,
            self.lr,
            self.batch_size,
            self.weight_decay,
            self.schedule,
            self.epochs,
            if aug.is_empty() { "none".to_string() } else { aug.join(", ") }
        )
    }
}
