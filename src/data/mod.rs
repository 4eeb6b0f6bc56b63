//! Datasets, augmentation and the loader that feeds training.
//!
//! A `Dataset` hands out decoded images (`crate::imaging::Image`: any bands, 8-bit or f32) with their labels; a
//! `Pipeline` turns one image into a normalised `[C, H, W]` tensor (random augmentation drawn from an RNG it is
//! given); the loader
//! (`loader::batches`) batches them on worker threads, deterministically for a seed whatever the thread timing.

use crate::error::Result;
use crate::imaging::Image;

pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn num_classes(&self) -> usize;
    fn class_names(&self) -> Vec<String>;
    /// Where sample `i` comes from, for per-image reports: a file path, or `#i` for a bundled set.
    fn source(&self, i: usize) -> String {
        format!("#{i}")
    }
    /// Image and label of sample `i` (< len). Called from loader worker threads.
    fn get(&self, i: usize) -> Result<(Image, usize)>;
}

pub mod cifar;
pub mod digits;
pub mod download;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod shapes;
pub mod split;
pub mod transforms;

pub use digits::Digits;
pub use folder::ImageFolder;
pub use loader::{Batch, LoaderConfig, batches, num_batches};
pub use split::Subset;
pub use transforms::{BatchMix, Op, Pipeline, RandomErasing};
