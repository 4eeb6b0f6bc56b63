//! `resnet serve`: the network behind HTTP with dynamic batching, as Triton and TorchServe serve models.
//!
//! The pieces: `routes` (the axum API and its one-line JSON errors), `batcher` (the executor thread that owns the
//! network and runs what arrives within `--max-delay-ms` as one batch), `metrics` (Prometheus). This file binds
//! the socket, runs hyper's HTTP/1.1 connections on tokio with a header-read timeout (a client that sends its
//! headers slower than `--header-timeout-s` is disconnected; hyper's timer covers idle keep-alive connections
//! too), and shuts down on Ctrl-C or SIGTERM: stop accepting, answer what is in flight, exit 0.

mod batcher;
mod metrics;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use crate::error::{Error, Result};
use crate::infer::card::ModelCard;
use crate::infer::quantize::Calibration;
use crate::infer::runner::Runner;
use crate::model::ResNet;
use crate::target::Target;

/// How the server runs; `resnet serve`'s flags.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: SocketAddr,
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Images waiting for the executor before new ones get 503.
    pub queue: usize,
    pub body_limit: usize,
    pub max_images: usize,
    pub request_timeout: Duration,
    pub header_timeout: Duration,
    pub top_k: usize,
}

/// Serve `model` until Ctrl-C or SIGTERM. The socket is bound first (a taken port is the one-line error), then
/// the network is opened and warmed up on the executor thread while `/v2/health/live` already answers.
pub fn run(
    model: ResNet,
    card: ModelCard,
    calibration: Option<Calibration>,
    labels: Vec<String>,
    target: Target,
    config: Config,
) -> Result<()> {
    let listener = std::net::TcpListener::bind(config.addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| Error::invalid(format!("cannot listen on {}: {e}", config.addr)))?;
    let local = listener.local_addr().map_err(|e| Error::invalid(format!("cannot listen: {e}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::invalid(format!("cannot start the async runtime: {e}")))?;

    let metrics = Arc::new(metrics::Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let side = card.preprocess.size as usize;
    let settings = batcher::Settings {
        max_batch: config.max_batch,
        max_delay: config.max_delay,
        capacity: config.queue,
        input: [card.preprocess.channels, side, side],
    };
    let max_batch = config.max_batch;
    let open = move || Runner::open(model, target, calibration.as_ref(), max_batch, side, side);
    let (queue, opened, executor) = batcher::spawn(open, settings, metrics.clone(), ready.clone())?;
    let app = Arc::new(routes::App {
        queue,
        metrics,
        ready,
        draining: AtomicBool::new(false),
        preprocess: card.preprocess.clone(),
        labels,
        top_k: config.top_k,
        body_limit: config.body_limit,
        request_timeout: config.request_timeout,
        max_images: config.max_images,
    });
    eprintln!(
        "serving {} ({} stem, {} channels at {side}x{side}) on http://{local}: POST /v1/predict, /v1/features; \
         GET /v2/health/live, /v2/health/ready, /metrics",
        card.arch, card.stem, card.preprocess.channels
    );
    let served = runtime.block_on(serve(listener, app, opened, &config));
    // Connections that outlived the drain are dropped with the runtime; then the last queue handle is gone and
    // the executor finishes its batch and ends.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let _ = executor.join();
    served
}

async fn serve(
    listener: std::net::TcpListener,
    app: Arc<routes::App>,
    opened: tokio::sync::oneshot::Receiver<Result<String>>,
    config: &Config,
) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| Error::invalid(format!("listen: {e}")))?;
    let service = TowerToHyperService::new(routes::router(app.clone()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(config.header_timeout);
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(shutdown_signal());
    let mut opened = std::pin::pin!(opened);
    let mut loading = true;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let connection = http.serve_connection(TokioIo::new(stream), service.clone());
                    let watched = graceful.watch(connection);
                    tokio::spawn(async move {
                        // A connection's own errors (a client gone mid-request, a header timeout) end only it.
                        let _ = watched.await;
                    });
                }
                // Out of file descriptors, say: wait a moment rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            result = &mut opened, if loading => {
                loading = false;
                match result {
                    Ok(Ok(device)) => eprintln!("ready on {device} (max batch {}, max delay {:?})", config.max_batch, config.max_delay),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(Error::invalid("the executor thread died while opening the network")),
                }
            },
            () = &mut stop => break,
        }
    }
    drop(listener);
    app.draining.store(true, Ordering::SeqCst);
    eprintln!("stopping: no new connections, finishing the requests in flight");
    let drain = config.request_timeout + Duration::from_secs(1);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        eprintln!("gave up on connections still open after {drain:?}");
    }
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix (what `docker stop`, Kubernetes and systemd send).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
