//! `resnet report RUN_DIR`: (re)write a training run's `report.html` and print its path.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;

#[derive(Args)]
pub struct ReportCmd {
    /// A training run's folder (the --out of `resnet train`).
    run_dir: PathBuf,
}

pub fn run(a: ReportCmd) -> Result<()> {
    println!("{}", crate::report::write(&a.run_dir)?.display());
    Ok(())
}
