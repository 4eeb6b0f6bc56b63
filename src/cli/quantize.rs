//! `resnet quantize`: post-training static quantization. Runs the network in f32 on calibration images (a
//! folder of the user's own, or the training split of the checkpoint's recipe) and writes the weights again
//! with each convolution input's uint8 parameters in the metadata (`infer::quantize`), for `--dtype int8` on
//! predict, features, eval, bench and serve. The weights stay f32 in the file (per-channel int8 is computed
//! from them exactly as the plan is built), so the same file still runs in f32.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::ModelArgs;
use crate::data::loader::{self, LoaderConfig, Shard};
use crate::error::{Error, Result};
use crate::infer::quantize::{self, METADATA_KEY, Method};
use crate::train::{checkpoint, setup};

#[derive(Args)]
pub struct QuantizeCmd {
    #[command(flatten)]
    model: ModelArgs,
    /// Calibration images: a folder (or file) of JPEG/PNG/TIFF/DICOM images like the ones the network will see,
    /// or `train` for the training split of the checkpoint's recipe.
    #[arg(long)]
    calibrate: PathBuf,
    /// How many calibration images (the folder's first in name order; the training split's first in its seeded
    /// order).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    images: u64,
    /// minmax (the range seen) or percentile (clipped to the 99.99th percentile of |x|; two passes).
    #[arg(long, value_enum, default_value = "minmax")]
    method: Method,
    /// The file to write (replaced atomically): the weights with the calibration in their metadata.
    #[arg(long)]
    out: PathBuf,
}

/// Calibration images per forward pass.
const BATCH: usize = 32;

pub fn run(a: QuantizeCmd) -> Result<()> {
    let opened = a.model.open()?;
    // The network runs the calibration (its plan takes it over); the file is written from its state_dict.
    let (state, counts) = (opened.model.state_dict(), crate::weights::batch_counts(&opened.model));
    let model = opened.model;
    let pre = opened.card.preprocess.clone();
    let want = a.images as usize;
    let calibration = if a.calibrate.as_os_str() == "train" {
        let recipe = opened.recipe.as_ref().ok_or_else(|| {
            Error::file(&a.model.weights, "has no training recipe: give --calibrate a folder of images")
        })?;
        let (train, _) = setup::datasets(recipe)?;
        let cfg = LoaderConfig {
            batch_size: BATCH,
            shuffle: true,
            drop_last: false,
            workers: 0,
            seed: recipe.seed,
            shard: Shard::WHOLE,
        };
        let pipeline = Arc::new(pre.pipeline());
        quantize::calibrate(model, a.method, |see| {
            let mut seen = 0;
            for batch in loader::batches(train.clone(), pipeline.clone(), None, &cfg, 0, 0) {
                let images = batch?.images;
                let [n, c, h, w] = images.dims4();
                let take = (want - seen).min(n);
                let first = images.into_data().into_iter().take(take * c * h * w).collect();
                see(&crate::engine::Tensor::new(&[take, c, h, w], first)?);
                seen += take;
                if seen == want {
                    break;
                }
            }
            Ok(())
        })?
    } else {
        let mut files = crate::infer::collect_images(std::slice::from_ref(&a.calibrate))?;
        files.sort();
        files.truncate(want);
        quantize::calibrate(model, a.method, |see| {
            for chunk in files.chunks(BATCH) {
                see(&crate::infer::load_batch(chunk, &pre)?);
            }
            Ok(())
        })?
    };
    let mut metadata = opened.card.to_metadata()?;
    if let Some(recipe) = &opened.recipe {
        metadata.insert("recipe".into(), recipe.to_toml());
        metadata.insert("format".into(), checkpoint::QUANTIZED_FORMAT.into());
    }
    metadata.insert(METADATA_KEY.into(), calibration.to_metadata());
    crate::weights::safetensors::save(&a.out, &state, &counts, &metadata)?;
    eprintln!(
        "calibrated {} convolution inputs on {} image(s) ({:?}); wrote {} (run it with --dtype int8)",
        calibration.inputs.len(),
        calibration.images,
        a.method,
        a.out.display()
    );
    Ok(())
}
