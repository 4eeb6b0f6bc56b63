//! The server's Prometheus metrics (`GET /metrics`, OpenMetrics text by the `prometheus-client` crate, the
//! Prometheus project's own Rust client): requests by endpoint and status code, request latency, batch size and
//! forward-pass time, queue depth, images served and images/s over the last 10 s.
//!
//! Buckets: latency from 1 ms doubling to 16 s (a batch-1 ResNet-34 forward is 20-80 ms on 2 cores, a full
//! batch of 32 about 1-2 s); batch sizes at powers of two up to 1024, the largest `--max-batch` allowed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Request {
    pub endpoint: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Endpoint {
    pub endpoint: String,
}

type Histograms = Family<Endpoint, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<Request, Counter>,
    pub latency: Histograms,
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
    pub queue_depth: Gauge,
    pub images: Counter,
    pub images_per_second: Gauge<f64, AtomicU64>,
    /// (when, images) of the batches of the last `WINDOW`.
    recent: Mutex<VecDeque<(Instant, usize)>>,
    started: Instant,
}

/// The span `images_per_second` averages over.
const WINDOW: Duration = Duration::from_secs(10);

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("resnet");
        let requests = Family::<Request, Counter>::default();
        let latency = Histograms::new_with_constructor(latency_histogram);
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        let batch_seconds = latency_histogram();
        let queue_depth = Gauge::default();
        let images = Counter::default();
        let images_per_second = Gauge::<f64, AtomicU64>::default();
        registry.register("requests", "HTTP requests by endpoint and status code", requests.clone());
        registry.register("request_duration_seconds", "Time from request to response", latency.clone());
        registry.register("batch_size", "Images per forward pass", batch_size.clone());
        registry.register("batch_duration_seconds", "Time of one batched forward pass", batch_seconds.clone());
        registry.register("queue_depth", "Images waiting for the executor", queue_depth.clone());
        registry.register("images", "Images run through the network", images.clone());
        registry.register("images_per_second", "Images per second over the last 10 s", images_per_second.clone());
        Metrics {
            registry,
            requests,
            latency,
            batch_size,
            batch_seconds,
            queue_depth,
            images,
            images_per_second,
            recent: Mutex::new(VecDeque::new()),
            started: Instant::now(),
        }
    }

    pub fn record_request(&self, endpoint: &str, code: u16, took: Duration) {
        self.requests.get_or_create(&Request { endpoint: endpoint.to_string(), code }).inc();
        self.latency.get_or_create(&Endpoint { endpoint: endpoint.to_string() }).observe(took.as_secs_f64());
    }

    pub fn record_batch(&self, images: usize, took: Duration) {
        self.batch_size.observe(images as f64);
        self.batch_seconds.observe(took.as_secs_f64());
        self.images.inc_by(images as u64);
        let now = Instant::now();
        // A poisoned lock only means a panic elsewhere mid-update; the window is still a valid queue.
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.push_back((now, images));
        while recent.front().is_some_and(|&(t, _)| now.duration_since(t) > WINDOW) {
            recent.pop_front();
        }
        let span = now.duration_since(self.started).min(WINDOW).as_secs_f64().max(1e-3);
        self.images_per_second.set(recent.iter().map(|&(_, n)| n).sum::<usize>() as f64 / span);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
