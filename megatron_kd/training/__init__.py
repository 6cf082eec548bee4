"""Training: loop, train-spec registry, objectives, optimizer/scheduler, checkpoints, run directory,
logging. Imports nothing from kd/, longred/ or above (tests/unit/test_layering.py)."""
