//! `resnet serve`: a checkpoint behind HTTP (`crate::serve`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use super::ModelArgs;
use crate::error::Result;
use crate::infer;
use crate::serve::{self, Config};
use crate::target::TargetArgs;

#[derive(Args)]
pub struct ServeCmd {
    #[command(flatten)]
    model: ModelArgs,
    /// Class names: "imagenet" or a text file with one name per line (default: the checkpoint's).
    #[arg(long)]
    labels: Option<String>,
    /// Address to listen on; 127.0.0.1 unless told otherwise (0.0.0.0:8080 to serve other machines; port 0 picks
    /// a free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Most images in one forward pass.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_batch: u64,
    /// How long the oldest waiting image waits for others to join its batch.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    max_delay_ms: u64,
    /// Images waiting for the network before new requests get 503 (default: 8 full batches).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    queue: Option<u64>,
    /// Largest request body, in MiB (413 above it).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_body_mib: u64,
    /// Most images in one multipart request.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_images: u64,
    /// Seconds a request may take from its headers to its answer (408 for a slow body, 504 for a late answer).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout_s: u64,
    /// Seconds a client has to send its request headers (slow clients are disconnected).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout_s: u64,
    /// Classes in each prediction.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    top_k: u64,
    #[command(flatten)]
    target: TargetArgs,
}

pub fn run(a: ServeCmd) -> Result<()> {
    let opened = a.model.open()?;
    let labels =
        infer::labels::for_model(a.labels.as_deref(), opened.card.classes.clone(), opened.model.config.num_classes)?;
    let max_batch = a.max_batch as usize;
    let config = Config {
        addr: a.addr,
        max_batch,
        max_delay: Duration::from_millis(a.max_delay_ms),
        queue: a.queue.map_or(8 * max_batch, |q| q as usize),
        body_limit: (a.max_body_mib as usize) << 20,
        max_images: a.max_images as usize,
        request_timeout: Duration::from_secs(a.timeout_s),
        header_timeout: Duration::from_secs(a.header_timeout_s),
        top_k: a.top_k as usize,
    };
    serve::run(opened.model, opened.card, opened.calibration, labels, a.target.target(), config)
}
