use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use super::{ModelArgs, Sharded};
use crate::error::{Error, Result};
use crate::infer;
use crate::infer::runner::Runner;
use crate::model::Tap;
use crate::target::TargetArgs;

#[derive(Args)]
pub struct FeaturesArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// avgpool, fc, or layer1..layer4 (spatially averaged).
    #[arg(long, default_value = "avgpool")]
    layer: String,
    /// Output by extension: .safetensors ("features" [N, D] f32, file names in the metadata key "files", a JSON
    /// array) or .npy (NumPy's format; the file names beside it in OUT.files.json).
    #[arg(long)]
    out: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_size: u64,
    /// Split the images over MPI ranks (`mpirun -n N resnet features --distributed ...`, feature `mpi`); rank 0
    /// writes one file with every image's row, in input order.
    #[arg(long)]
    distributed: bool,
    #[command(flatten)]
    target: TargetArgs,
    /// JPEG, PNG, TIFF or DICOM files, or directories of them (.jpg/.jpeg/.png/.tif/.tiff/.dcm).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn run(a: FeaturesArgs) -> Result<()> {
    let tap: Tap = a.layer.parse()?;
    let out_kind = OutKind::of(&a.out)?;
    let opened = a.model.open()?;
    let arch = opened.card.arch;
    let model = opened.model;
    let files = infer::collect_images(&a.images)?;
    let (batch, side, width) = (a.batch_size as usize, opened.card.preprocess.size as usize, model.graph.width(tap));
    let open = || Runner::open(model, a.target.target(), opened.calibration.as_ref(), batch, side, side);
    let sharded = Sharded::new(a.distributed, files.len())?;
    let feats = sharded.rows(&files, &opened.card.preprocess, open, (batch, width), |r, b| r.features(b, tap))?;
    let Some(feats) = feats else { return Ok(()) };
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let files_json = serde_json::to_string(&names).map_err(Error::invalid)?;
    let [n, d] = feats.dims2();
    match out_kind {
        OutKind::Safetensors => {
            let metadata = BTreeMap::from([
                ("files".to_string(), files_json),
                ("layer".to_string(), a.layer.clone()),
                ("arch".to_string(), arch.to_string()),
            ]);
            let tensors = BTreeMap::from([("features".to_string(), feats)]);
            crate::weights::safetensors::save(&a.out, &tensors, &BTreeMap::new(), &metadata)?;
            eprintln!("wrote {n}x{d} features from {} to {}", a.layer, a.out.display());
        }
        OutKind::Npy => {
            let names_path = a.out.with_extension("files.json");
            crate::weights::write_atomic(&names_path, files_json.as_bytes())?;
            crate::weights::write_atomic(&a.out, &infer::npy_f32(&feats))?;
            eprintln!(
                "wrote {n}x{d} features from {} to {} (file names in {})",
                a.layer,
                a.out.display(),
                names_path.display()
            );
        }
    }
    Ok(())
}

/// What `--out` is written as, by its extension.
enum OutKind {
    Safetensors,
    Npy,
}

impl OutKind {
    fn of(path: &std::path::Path) -> Result<OutKind> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("safetensors") => Ok(OutKind::Safetensors),
            Some("npy") => Ok(OutKind::Npy),
            _ => Err(Error::file(path, "--out must end in .safetensors or .npy (the format follows the extension)")),
        }
    }
}
