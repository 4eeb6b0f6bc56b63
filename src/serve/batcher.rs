//! Dynamic batching, as Triton's `max_queue_delay_microseconds` and TorchServe's `max_batch_delay` do it: requests
//! that arrive within `max_delay` of the oldest waiting one run as one forward pass of up to `max_batch` images.
//!
//! One executor thread owns the network (one inference plan for every request; on a GPU the CUDA context stays on
//! the thread that made it). HTTP handlers hand it preprocessed images through a bounded queue: a full queue is
//! refused at once (the handler answers 503 with Retry-After) rather than letting latency grow without bound.
//! Jobs whose client has gone (disconnected, timed out) are dropped before the forward pass, not computed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use crate::engine::Tensor;
use crate::error::{Error, Result};
use crate::infer::runner::Runner;
use crate::model::Tap;

/// What a request wants out of the network for its image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Logits,
    Features(Tap),
}

/// One image, preprocessed to the network's input (`[C, H, W]`), and where its row goes.
pub struct Job {
    pub image: Tensor,
    pub output: Output,
    pub reply: oneshot::Sender<std::result::Result<Vec<f32>, String>>,
    pub queued: Instant,
}

/// The sending side: cheap to clone, one per handler.
#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    /// Images of requests being read or decoded: on their way to the queue.
    incoming: Arc<AtomicUsize>,
}

/// Images announced with `Queue::incoming`, counted until this is dropped (after they are submitted, or when
/// their request fails).
pub struct Incoming {
    counter: Arc<AtomicUsize>,
    images: usize,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.images, Ordering::SeqCst);
    }
}

/// `Queue::submit` refused the job: the queue holds its maximum.
pub struct Full;

impl Queue {
    pub fn submit(&self, job: Job) -> std::result::Result<(), Full> {
        // Counted before the send so that the executor's decrement can never run first and wrap.
        self.depth.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(Full)
            }
        }
    }

    /// Tell the executor that `images` are being decoded, so that it waits for them (up to the batch's
    /// deadline); with none announced and none queued it runs what it has at once: a lone request pays no
    /// `max_delay`.
    pub fn incoming(&self, images: usize) -> Incoming {
        self.incoming.fetch_add(images, Ordering::SeqCst);
        Incoming { counter: self.incoming.clone(), images }
    }

    /// Images waiting for the executor.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}

pub struct Settings {
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Images the queue holds before refusing more.
    pub capacity: usize,
    /// The input shape `[C, H, W]`, for the warm-up passes.
    pub input: [usize; 3],
}

/// Start the executor thread: `open` builds the network on it, then it warms up (one forward at batch 1 and one
/// at `max_batch`, so the first request pays no plan building), sets `ready` and reports the device on the
/// returned channel (or the error that stopped it). The thread ends when every `Queue` clone is dropped and the
/// queue is drained.
pub fn spawn(
    open: impl FnOnce() -> Result<Runner> + Send + 'static,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> Result<(Queue, oneshot::Receiver<Result<String>>, JoinHandle<()>)> {
    let (tx, rx) = sync_channel::<Job>(settings.capacity);
    let depth = Arc::new(AtomicUsize::new(0));
    let incoming = Arc::new(AtomicUsize::new(0));
    let (opened_tx, opened_rx) = oneshot::channel::<Result<String>>();
    let (thread_depth, thread_incoming) = (depth.clone(), incoming.clone());
    let thread = std::thread::Builder::new()
        .name("resnet-executor".into())
        .spawn(move || {
            let mut runner = match open().and_then(|r| warm_up(r, &settings)) {
                Ok(r) => r,
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                    return;
                }
            };
            ready.store(true, Ordering::SeqCst);
            let _ = opened_tx.send(Ok(runner.describe()));
            execute(&mut runner, &rx, &settings, [&thread_depth, &thread_incoming], &metrics);
        })
        .map_err(|e| Error::invalid(format!("cannot start the executor thread: {e}")))?;
    Ok((Queue { tx, depth, incoming }, opened_rx, thread))
}

fn warm_up(mut runner: Runner, s: &Settings) -> Result<Runner> {
    let [c, h, w] = s.input;
    for n in [1, s.max_batch] {
        runner.forward(&Tensor::zeros(&[n, c, h, w]))?;
    }
    Ok(runner)
}

/// The executor loop: wait for a job, gather what is queued or on its way until the oldest job's deadline or
/// a full batch, run each kind of output as one forward pass, answer every job.
fn execute(
    runner: &mut Runner,
    rx: &Receiver<Job>,
    s: &Settings,
    [depth, incoming]: [&AtomicUsize; 2],
    metrics: &Metrics,
) {
    while let Ok(first) = rx.recv() {
        let deadline = first.queued + s.max_delay;
        let mut jobs = vec![first];
        while jobs.len() < s.max_batch {
            if let Ok(job) = rx.try_recv() {
                jobs.push(job);
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || incoming.load(Ordering::SeqCst) == 0 {
                break;
            }
            // Short waits, so that the gathering stops as soon as nothing more is on its way.
            if let Ok(job) = rx.recv_timeout(left.min(POLL)) {
                jobs.push(job);
            }
        }
        depth.fetch_sub(jobs.len(), Ordering::SeqCst);
        jobs.retain(|j| !j.reply.is_closed());
        while !jobs.is_empty() {
            let output = jobs[0].output;
            let (group, rest): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| j.output == output);
            jobs = rest;
            run(runner, group, output, metrics);
        }
    }
}

/// How often a gathering batch checks whether more images are still on their way (a wake-up costs microseconds;
/// a forward pass tens of milliseconds).
const POLL: Duration = Duration::from_millis(1);

fn run(runner: &mut Runner, jobs: Vec<Job>, output: Output, metrics: &Metrics) {
    let n = jobs.len();
    let shape = jobs[0].image.shape().to_vec();
    let mut data = Vec::with_capacity(n * jobs[0].image.numel());
    for j in &jobs {
        data.extend_from_slice(j.image.data());
    }
    let started = Instant::now();
    let result = Tensor::new(&[&[n][..], &shape].concat(), data).and_then(|x| match output {
        Output::Logits => runner.forward(&x),
        Output::Features(tap) => runner.features(&x, tap),
    });
    metrics.record_batch(n, started.elapsed());
    match result {
        Ok(rows) => {
            let d = rows.numel() / n;
            for (j, row) in jobs.into_iter().zip(rows.data().chunks_exact(d)) {
                let _ = j.reply.send(Ok(row.to_vec()));
            }
        }
        Err(e) => {
            for j in jobs {
                let _ = j.reply.send(Err(e.to_string()));
            }
        }
    }
}
