//! The engine: a tensor, the backend seam and the operations ResNet needs, each with forward and backward.

pub mod backend;
pub mod cpu;
pub mod tensor;

pub use backend::{Backend, ConvGeom};
pub use tensor::Tensor;
