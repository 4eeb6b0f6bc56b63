//! The ResNet family: the architecture table, the blocks, and the network with its named parameters.

pub mod family;
pub mod graph;
pub mod layers;
mod resnet;
pub mod store;
pub mod summary;

pub use family::{Arch, BlockKind, FAMILY, MAX_IN_CHANNELS, ResNetConfig, STANDARD_WIDTHS, Stem};
pub use graph::Graph;
pub use layers::Mode;
pub use resnet::{ResNet, Tap};
