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
use mpi::traits::*;

use super::Comm;
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
