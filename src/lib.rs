//! resnet-rs: ResNet-18/34/50/101/152 with torchvision-compatible weights on a small engine of our own.
//!
//! # The library
//!
//! The crate root is the API: what a program needs to build, load, train and run a ResNet, re-exported from the
//! layer that owns it. The modules below stay public because the parity tests check their parts one by one
//! (single ops, kernels, transforms, loaders); their paths may change between versions, the root's should not.
//!
//! ```
//! use resnet_rs::{Arch, ResNet, ResNetConfig, Runner, Target, Tensor};
//!
//! // A resnet18 with 10 classes and seeded random weights (`open_model` reads a checkpoint or a torchvision
//! // .pth instead, with the preprocessing its model card records).
//! let arch: Arch = "resnet18".parse()?;
//! let model = ResNet::new(ResNetConfig::new(arch, 10), 0);
//! let mut runner = Runner::open(model, Target::CPU, None, 2, 32, 32)?;
//! let images = Tensor::new(&[2, 3, 32, 32], vec![0.5; 2 * 3 * 32 * 32])?;
//! let logits = runner.forward(&images)?;
//! assert_eq!(logits.shape(), &[2, 10]);
//! # Ok::<(), resnet_rs::Error>(())
//! ```
//!
//! Layers, each importing only those below it (`tests/layers.rs` holds the rule): `cli` → `train`, `infer`,
//! `serve` (HTTP), `export` (ONNX, pth, safetensors) → `exec` (what walks the graph on a target) → `model` (the
//! graph, the store, the CPU layers) → `engine` (the kernels, over `Tensor`); `data`, `imaging`, `weights`,
//! `fetch` and `files` beside them.

#[macro_use]
mod named;

pub mod cli;
pub mod data;
pub mod engine;
pub mod error;
pub mod exec;
pub mod export;
pub mod fetch;
pub mod files;
pub mod imaging;
pub mod infer;
pub mod model;
pub mod report;
pub mod serve;
pub mod target;
pub mod train;
pub mod weights;

pub use data::{Dataset, Digits, ImageFolder};
pub use engine::cpu::Cpu;
pub use engine::{Backend, ConvGeom, Precision, Tensor};
pub use error::{Error, Result};
pub use exec::cpu_plan::CpuPlan;
#[cfg(feature = "cuda")]
pub use exec::cuda::{CudaResNet, CudaTrainer};
pub use imaging::{Image, Samples};
pub use infer::card::{ModelCard, Preprocess};
pub use infer::runner::Runner;
pub use model::{Arch, Graph, Mode, ResNet, ResNetConfig, Stem, Tap};
pub use target::{DeviceSpec, Target};
pub use train::checkpoint::{Opened, open_model};
pub use train::optim::{Optimizer, OptimizerKind, ParamGroup};
pub use train::recipe::Recipe;
pub use train::trainer::{EpochReport, StepOutcome, TrainArgs, Trainer};
pub use weights::{Variant, load_state_dict, save_model};
