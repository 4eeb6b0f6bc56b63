//! resnet-rs: ResNet-18/34/50/101/152 with torchvision-compatible weights on a small engine of our own.

#[macro_use]
mod named;

pub mod cli;
pub mod data;
pub mod engine;
pub mod error;
pub mod exec;
pub mod files;
pub mod imaging;
pub mod infer;
pub mod model;
pub mod target;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
