"""Training: loop, objectives, optimizer/scheduler, checkpoints, run directory, logging."""
