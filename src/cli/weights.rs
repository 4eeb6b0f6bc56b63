//! `resnet weights list|fetch`: torchvision's published ImageNet weights for the family, where each would be
//! cached, and a download ahead of time (a machine about to go offline, a container image being built).

use clap::{Args, Subcommand};

use crate::error::Result;
use crate::weights::hub::{self, PUBLISHED};

#[derive(Args)]
pub struct WeightsCmd {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// The published names, their ImageNet top-1, size, and whether they are cached.
    List,
    /// Download (or find in the cache) and verify weights by name or URL; prints the local path.
    Fetch {
        /// torchvision:resnet34, torchvision:resnet50:IMAGENET1K_V1, or https://…/name-<sha256 prefix>.pth
        names: Vec<String>,
    },
}

pub fn run(a: WeightsCmd) -> Result<()> {
    match a.action {
        Action::List => {
            let cache = hub::cache_dir()?;
            println!("{:<34} {:>7} {:>7}  file (cache: {})", "name", "top-1", "MB", cache.display());
            for p in PUBLISHED {
                let cached = if cache.join(p.file).is_file() { "  [cached]" } else { "" };
                let name = if p.default { format!("torchvision:{} (default)", p.arch) } else { p.name() };
                println!("{:<34} {:>6.2}% {:>7.1}  {}{cached}", name, p.top1, p.megabytes, p.file);
            }
            Ok(())
        }
        Action::Fetch { names } => {
            if names.is_empty() {
                return Err(crate::Error::invalid("name the weights to fetch (see `resnet weights list`)"));
            }
            for name in names {
                let remote = hub::remote(&name)?;
                println!("{}", hub::fetch_remote(&remote, &name)?.display());
            }
            Ok(())
        }
    }
}
