//! `Comm` on MPI (feature `mpi`): the `mpi` crate (rsmpi) over the system's MPI (Open MPI from Debian's
//! `libopenmpi-dev` at build time). `mpirun`/`srun` start the ranks and MPI's own rendezvous connects them; the
//! sums are `MPI_Allreduce`, the broadcast `MPI_Bcast` and the gather `MPI_Gather`, rooted at rank 0. The
//! `Universe` is held for the run and dropped with the last `Arc`, which calls `MPI_Finalize` (without it
//! `mpirun` reports the ranks as failed).
//!
//! A rank that dies makes `mpirun` end the job; one that hangs (stopped, deadlocked, its node gone silent) would
//! leave the others waiting in a collective forever, so a watchdog thread ends this rank with one line and exit
//! code 3 when a collective has not completed within `RESNET_DDP_TIMEOUT` seconds (default 600: longer than a
//! rank-0 checkpoint write or the slowest rank's data loading, shorter than a scheduler's patience), and
//! `mpirun` then ends the others.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::ffi;
use mpi::traits::*;

use super::{Comm, PendingSum};
use crate::error::{Error, Result};

struct Mpi {
    universe: Universe,
    watchdog: Arc<Watchdog>,
}

/// When the collective in progress must have finished, in milliseconds since `start` (0: none in progress).
struct Watchdog {
    start: Instant,
    deadline_ms: AtomicU64,
    timeout: Duration,
}

impl Watchdog {
    fn spawn(rank: usize, timeout: Duration) -> Arc<Watchdog> {
        let dog = Arc::new(Watchdog { start: Instant::now(), deadline_ms: AtomicU64::new(0), timeout });
        let watched = dog.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let deadline = watched.deadline_ms.load(Ordering::SeqCst);
                if deadline != 0 && watched.start.elapsed().as_millis() as u64 > deadline {
                    eprintln!(
                        "error: rank {rank}: a collective call got no answer from the other ranks within {} s \
                         (RESNET_DDP_TIMEOUT): a rank died or hangs; stopping",
                        watched.timeout.as_secs()
                    );
                    std::process::exit(3);
                }
            }
        });
        dog
    }

    /// Watch `f`, a collective call.
    fn watch<T>(&self, f: impl FnOnce() -> T) -> T {
        let deadline = (self.start.elapsed() + self.timeout).as_millis() as u64;
        self.deadline_ms.store(deadline.max(1), Ordering::SeqCst);
        let out = f();
        self.deadline_ms.store(0, Ordering::SeqCst);
        out
    }
}

pub fn world() -> Result<Arc<dyn Comm>> {
    let universe = mpi::initialize().ok_or_else(|| Error::invalid("MPI is already initialised in this process"))?;
    let timeout = match std::env::var("RESNET_DDP_TIMEOUT") {
        Ok(v) => v.parse::<u64>().ok().filter(|&s| s > 0).ok_or_else(|| {
            Error::invalid(format!("RESNET_DDP_TIMEOUT={v}: give the seconds a collective may take (a whole number)"))
        })?,
        Err(_) => 600,
    };
    let rank = universe.world().rank() as usize;
    Ok(Arc::new(Mpi { universe, watchdog: Watchdog::spawn(rank, Duration::from_secs(timeout)) }))
}

impl Comm for Mpi {
    fn rank(&self) -> usize {
        self.universe.world().rank() as usize
    }

    fn size(&self) -> usize {
        self.universe.world().size() as usize
    }

    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let send = values.to_vec();
        self.watchdog.watch(|| self.universe.world().all_reduce_into(&send[..], values, SystemOperation::sum()));
        Ok(())
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let send = values.to_vec();
        self.watchdog.watch(|| self.universe.world().all_reduce_into(&send[..], values, SystemOperation::sum()));
        Ok(())
    }

    fn broadcast_f32(&self, values: &mut [f32]) -> Result<()> {
        self.watchdog.watch(|| self.universe.world().process_at_rank(0).broadcast_into(values));
        Ok(())
    }

    fn start_sum_f32(&self, values: Vec<f32>) -> Box<dyn PendingSum> {
        let mut sum = Iallreduce {
            recv: vec![0f32; values.len()],
            send: values,
            request: unsafe { ffi::RSMPI_REQUEST_NULL },
            done: false,
            failed: None,
            watchdog: self.watchdog.clone(),
        };
        let count = sum.send.len() as std::os::raw::c_int;
        // SAFETY: `send` and `recv` are heap buffers of `count` f32s each, owned by `sum` and neither read nor
        // moved (a Vec's buffer stays put when the Vec moves) until MPI_Wait/MPI_Test has reported the request
        // complete: `wait` and `Drop` both wait first. RSMPI_FLOAT/RSMPI_SUM and the world communicator are
        // valid handles for as long as the universe (held by `self`) lives.
        let code = unsafe {
            ffi::MPI_Iallreduce(
                sum.send.as_ptr().cast(),
                sum.recv.as_mut_ptr().cast(),
                count,
                ffi::RSMPI_FLOAT,
                ffi::RSMPI_SUM,
                self.universe.world().as_raw(),
                &mut sum.request,
            )
        };
        if code != 0 {
            sum.done = true;
            sum.failed = Some(code);
        }
        Box::new(sum)
    }

    fn gather_f32(&self, local: &[f32]) -> Result<Option<Vec<f32>>> {
        let world = self.universe.world();
        let root = world.process_at_rank(0);
        let gathered = self.watchdog.watch(|| {
            if world.rank() == 0 {
                let mut all = vec![0f32; local.len() * world.size() as usize];
                root.gather_into_root(local, &mut all[..]);
                Some(all)
            } else {
                root.gather_into(local);
                None
            }
        });
        Ok(gathered)
    }
}

/// A sum started with MPI_Iallreduce, owning the buffers MPI reads and writes until it is complete.
struct Iallreduce {
    send: Vec<f32>,
    recv: Vec<f32>,
    request: ffi::MPI_Request,
    done: bool,
    /// MPI's error code, when the start failed.
    failed: Option<std::os::raw::c_int>,
    watchdog: Arc<Watchdog>,
}

// SAFETY: the request handle is only used by the thread that runs backward and the training loop (the one that
// initialised MPI); the struct moves between owners (`Box<dyn PendingSum>` in a `Mutex`) but is never touched
// from two threads, which MPI's default threading level (funneled through that thread) allows.
unsafe impl Send for Iallreduce {}

impl Iallreduce {
    /// Block until MPI has finished with the buffers (watched: a rank that never joins ends this one).
    fn complete(&mut self) {
        if !self.done {
            // SAFETY: `request` came from MPI_Iallreduce and has not completed (`done` is false).
            self.watchdog.watch(|| unsafe { ffi::MPI_Wait(&mut self.request, ffi::RSMPI_STATUS_IGNORE) });
            self.done = true;
        }
    }
}

impl PendingSum for Iallreduce {
    fn test(&mut self) -> bool {
        if !self.done {
            let mut flag = 0;
            // SAFETY: as in `complete`; MPI_Test sets `flag` and, once complete, frees the request.
            unsafe { ffi::MPI_Test(&mut self.request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
            self.done = flag != 0;
        }
        self.done
    }

    fn wait(mut self: Box<Self>) -> Result<Vec<f32>> {
        self.complete();
        match self.failed {
            Some(code) => Err(Error::invalid(format!("MPI_Iallreduce failed (MPI error {code})"))),
            None => Ok(std::mem::take(&mut self.recv)),
        }
    }
}

impl Drop for Iallreduce {
    fn drop(&mut self) {
        // MPI may still be writing `recv`: it must finish before the buffers are freed.
        self.complete();
    }
}
