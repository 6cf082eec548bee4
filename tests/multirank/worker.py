"""``megatron-kd`` entry point for the multi-rank tests (run directly or under torchrun).

Identical to ``python -m megatron_kd.cli`` except for one test hook: with
``MKD_TEST_HANG_AT_SAVE=<iteration>`` every rank, after writing its shards of that iteration's
checkpoint into ``iter_XXXXXXX.tmp`` (i.e. before the rename and the ``latest`` pointer update),
touches ``<tmp>/../hang.<rank>`` and sleeps. The test then SIGKILLs the whole process group, so
the kill provably lands in the middle of a checkpoint save, not after the run has finished.
"""
import os
import sys
import time
from pathlib import Path


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
            rank = os.environ.get("RANK", "0")
            (Path(checkpoint_dir).parent / f"hang.{rank}").write_text("hanging\n")
            time.sleep(3600)
        return out

    dist_checkpointing.save = save


if __name__ == "__main__":
    _install_hang_hook()
    from megatron_kd.cli import main

    sys.exit(main())
