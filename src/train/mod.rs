//! Training: optimisers, learning-rate schedules, the loop, monitoring and checkpoints.
