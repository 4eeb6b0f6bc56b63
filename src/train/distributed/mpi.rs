//! `Comm` on MPI (feature `mpi`): the `mpi` crate (rsmpi) over the system's MPI (Open MPI from Debian's
//! `libopenmpi-dev` at build time). `mpirun`/`srun` start the ranks and MPI's own rendezvous connects them; the
//! sums are `MPI_Allreduce`, the broadcast `MPI_Bcast` from rank 0. The `Universe` is held for the run and
//! dropped with the last `Arc`, which calls `MPI_Finalize` (without it `mpirun` reports the ranks as failed).

use std::sync::Arc;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::traits::*;

use super::Comm;
use crate::error::{Error, Result};

struct Mpi {
    universe: Universe,
}

pub fn world() -> Result<Arc<dyn Comm>> {
    let universe = mpi::initialize().ok_or_else(|| Error::invalid("MPI is already initialised in this process"))?;
    Ok(Arc::new(Mpi { universe }))
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
        self.universe.world().all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let send = values.to_vec();
        self.universe.world().all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn broadcast_f32(&self, values: &mut [f32]) -> Result<()> {
        self.universe.world().process_at_rank(0).broadcast_into(values);
        Ok(())
    }

    fn gather_f32(&self, local: &[f32]) -> Result<Option<Vec<f32>>> {
        let world = self.universe.world();
        let root = world.process_at_rank(0);
        if world.rank() == 0 {
            let mut all = vec![0f32; local.len() * world.size() as usize];
            root.gather_into_root(local, &mut all[..]);
            Ok(Some(all))
        } else {
            root.gather_into(local);
            Ok(None)
        }
    }
}
