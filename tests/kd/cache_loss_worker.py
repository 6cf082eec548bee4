"""Worker for test_teacher_cache.py: cache_loss_cases.py under ``torchrun --nproc-per-node 2``
(gloo), the whole world as the TP group, megatron-core's TP getters patched to raise; rank 0
prints one ``RESULT {json}`` line (errors max-reduced over ranks)."""
import torch.distributed as dist

import cache_loss_cases
import kd_cases


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    kd_cases.forbid_parallel_state_getters(setattr)
    tp_group = dist.new_group(list(range(world)))
    kd_cases.print_worst(cache_loss_cases.run_all(tp_group, rank, world, cache_loss_cases.TP2_CASES), rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
