//! Training: optimisers, learning-rate schedules, the loop, monitoring and checkpoints.

pub mod checkpoint;
pub mod defaults;
pub mod distributed;
pub mod ema;
pub mod evaluate;
#[cfg(feature = "cuda")]
mod gpu;
pub mod monitor;
pub mod optim;
pub mod recipe;
pub mod schedule;
pub mod setup;
pub mod steps;
pub mod trainer;
