use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use super::ModelArgs;
use crate::error::{Error, Result};
use crate::infer;
use crate::infer::runner::{DeviceSpec, Precision, Runner};
use crate::model::Tap;

#[derive(Args)]
pub struct FeaturesArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// avgpool, fc, or layer1..layer4 (spatially averaged).
    #[arg(long, default_value = "avgpool")]
    layer: String,
    /// Output .safetensors: "features" [N, D] f32, file names in the metadata ("files", a JSON array).
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda, cuda:N or auto (a GPU when this build has the `cuda` feature and finds one).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// f32; bf16 (bf16 convolution operands, fp32 accumulation: on a GPU, or a CPU with AVX512-BF16); on a GPU
    /// also tf32 (TF32 tensor-core convolutions).
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// JPEG or PNG files, or directories of them.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn run(a: FeaturesArgs) -> Result<()> {
    let tap: Tap = a.layer.parse()?;
    let model = crate::weights::load_model(a.model.arch, &a.model.weights)?;
    let files = infer::collect_images(&a.images)?;
    let x = infer::load_batch(&files)?;
    let [_, _, h, w] = x.dims4();
    let batch = a.model.batch_size as usize;
    let mut runner = Runner::with_precision(model, a.device, batch, h, w, a.dtype)?;
    let feats = infer::batched(&x, batch, |b| runner.features(b, tap))?;
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let metadata = BTreeMap::from([
        ("files".to_string(), serde_json::to_string(&names).map_err(Error::invalid)?),
        ("layer".to_string(), a.layer.clone()),
        ("arch".to_string(), a.model.arch.to_string()),
    ]);
    let tensors = BTreeMap::from([("features".to_string(), feats)]);
    crate::weights::safetensors::save(&a.out, &tensors, &BTreeMap::new(), &metadata)?;
    let [n, d] = tensors["features"].dims2();
    eprintln!("wrote {n}x{d} features from {} to {}", a.layer, a.out.display());
    Ok(())
}
