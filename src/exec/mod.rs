//! The execution layer: what walks `model::Graph` on a target. The CPU inference plan (`cpu_plan`: BN folded,
//! each unit's packed or transformed weights kept once), the CUDA executors (`cuda`: inference and training
//! resident on the device) and the optimiser description they share (`optim`).
//!
//! Dependencies point down: `cli → train/infer → exec → model, engine`. The kernel layer below (`engine`) knows
//! tensors, buffers and shapes only; `tests/layers.rs` fails when a kernel file imports a layer above it.

pub mod cpu_plan;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod optim;

pub use crate::engine::Precision;
