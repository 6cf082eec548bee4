"""``megatron-kd`` entry point for the multi-rank tests (run directly or under torchrun).

Identical to ``python -m megatron_kd.cli`` except for test hooks, each off unless its variable
is set:

``MKD_TEST_HANG_AT_SAVE=<iteration>``
    every rank, after writing its shards of that iteration's checkpoint into
    ``iter_XXXXXXX.tmp`` (i.e. before the rename and the ``latest`` pointer update), touches
    ``<tmp>/../hang.<rank>`` and sleeps. The test then SIGKILLs the whole process group, so the
    kill provably lands in the middle of a checkpoint save, not after the run has finished.
``MKD_TEST_RECORD_IDS=<dir>``
    after every training step, each rank appends ``{"iteration", "rank", "ids"}`` (one JSON line,
    flushed) to ``<dir>/ids.<rank>.jsonl``: the train-split window indices its data iterator
    read during that step, in order. Appended across attempts, so after kills and resumes the
    file holds every attempt of a step; the last line of an iteration is the attempt that counted.
``MKD_TEST_HANG_AT_STEP=<iteration>`` (with ``MKD_TEST_RECORD_IDS``)
    every rank, after recording that step (its forward, backward and optimizer update done, but
    before the loop counts it, logs or checkpoints), touches ``<dir>/hang.<rank>`` and sleeps:
    a kill there loses a finished step that no checkpoint holds.
``MKD_TEST_SAVE_AT_START=1``
    save a checkpoint right after setup (after any load), before the first step: with
    ``train.train_iters`` equal to the loaded iteration the run is a pure load-and-save (0
    steps), which is how a checkpoint is converted to another layout for comparison.
``MKD_TEST_NAN_AT=<iteration>[,<iteration>...][@<rank>]``
    in those training iterations the cross-entropy loss of one rank (default 0) is NaN: its
    loss sums and, through the backward, every gradient (training/nonfinite.py's check sees the
    loss on that rank and the grad norm on all). Evaluation is untouched.
"""
import json
import os
import sys
import time
from pathlib import Path


def _hang(marker_dir) -> None:
    rank = os.environ.get("RANK", "0")
    (Path(marker_dir) / f"hang.{rank}").write_text("hanging\n")
    time.sleep(3600)


def _install_hang_hook():
    at = os.environ.get("MKD_TEST_HANG_AT_SAVE")
    if not at:
        return
    from megatron.core import dist_checkpointing

    tag = f"iter_{int(at):07d}.tmp"
    original = dist_checkpointing.save

    def save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        out = original(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        if str(checkpoint_dir).endswith(tag):
            _hang(Path(checkpoint_dir).parent)
        return out

    dist_checkpointing.save = save


def _install_record_hook():
    out = os.environ.get("MKD_TEST_RECORD_IDS")
    if not out:
        return
    hang_at = int(os.environ.get("MKD_TEST_HANG_AT_STEP") or 0)
    from megatron_kd.data.packed_dataset import PackedDataset
    from megatron_kd.training.loop import Trainer

    get_item, train_step = PackedDataset.__getitem__, Trainer.train_step
    step = {"trainer": None, "ids": []}  # the trainer inside a training step, and what it read

    def recording_get_item(self, idx):
        trainer = step["trainer"]
        if trainer is not None and self is trainer.train_ds:  # not the valid split
            step["ids"].append(int(idx))
        return get_item(self, idx)

    def recording_train_step(self, data_iterator):
        step["trainer"], step["ids"] = self, []
        try:
            result = train_step(self, data_iterator)
        finally:
            step["trainer"] = None
        iteration = self.state.iteration + 1  # the loop counts the step after it returns
        rank = int(os.environ.get("RANK", "0"))
        with open(Path(out) / f"ids.{rank}.jsonl", "a") as f:
            f.write(json.dumps({"iteration": iteration, "rank": rank, "ids": step["ids"]}) + "\n")
        if iteration == hang_at:
            _hang(out)
        return result

    PackedDataset.__getitem__ = recording_get_item
    Trainer.train_step = recording_train_step


def _install_save_at_start_hook():
    if os.environ.get("MKD_TEST_SAVE_AT_START") != "1":
        return
    from megatron_kd.training.loop import Trainer

    setup = Trainer.setup

    def setup_then_save(self, *args, **kwargs):
        out = setup(self, *args, **kwargs)
        self.save()
        return out

    Trainer.setup = setup_then_save


def _install_nan_hook():
    spec = os.environ.get("MKD_TEST_NAN_AT")
    if not spec:
        return
    import torch

    from megatron_kd.training.loop import Trainer
    from megatron_kd.training.objective import CrossEntropyObjective

    its, _, rank = spec.partition("@")
    at, rank = {int(i) for i in its.split(",")}, int(rank or 0)
    train_step, loss_func = Trainer.train_step, CrossEntropyObjective.loss_func
    poison = {"on": False}

    def poisoned_train_step(self, data_iterator):
        poison["on"] = (self.state.iteration + 1 in at  # the loop counts the step after it returns
                        and torch.distributed.get_rank() == rank)
        try:
            return train_step(self, data_iterator)
        finally:
            poison["on"] = False

    def poisoned_loss_func(self, loss_mask, output):
        loss_sum, count, report = loss_func(self, loss_mask, output)
        if not poison["on"]:
            return loss_sum, count, report
        nan = torch.tensor(float("nan"))
        return loss_sum * nan, count, {k: v * torch.stack([nan, torch.tensor(1.0)]) for k, v in report.items()}

    Trainer.train_step = poisoned_train_step
    CrossEntropyObjective.loss_func = poisoned_loss_func


if __name__ == "__main__":
    _install_hang_hook()
    _install_record_hook()
    _install_save_at_start_hook()
    _install_nan_hook()
    from megatron_kd.cli import main

    sys.exit(main())
