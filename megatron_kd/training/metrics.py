"""Console, JSON-lines and TensorBoard logging of training metrics (rank 0 of the last stage)."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if enabled:
            self._jsonl = open(Path(run_dir) / "logs" / "metrics.jsonl", "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; keep logging anyway
                self._writer = None

    def log(self, iteration: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"iteration": iteration, "split": prefix, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._writer.add_scalar(f"{prefix}/{k}", v, iteration)
        parts = " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        print(f"[{prefix}] iter {iteration:6d} | {parts}", flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._writer:
            self._writer.close()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4e}" if (abs(v) < 1e-3 and v != 0) else f"{v:.4f}"
    return str(v)
