"""Worker for test_kd_losses.py: run under ``torchrun --nproc-per-node TP`` (gloo, CPU).

Runs every case of kd_cases.py with the whole world as the TP group, with megatron-core's
``parallel_state`` TP getters patched to raise. At TP=4 it also splits the world into two TP=2
groups {0,1} and {2,3} holding *different* data, so a loss that reduced over the wrong group
(e.g. the default/world group) would fail. Errors are max-reduced over ranks; rank 0 prints one
``RESULT {json}`` line.
"""

import torch.distributed as dist

import kd_cases

SUBGROUP_CASES = [
    ("forward_kl", dict(divergence="forward_kl", temperature=2.0, teacher_grad=True)),
    ("jsd_k3", dict(divergence="jsd", beta=0.5, top_k=3, teacher_grad=True)),
    ("reverse_k9", dict(divergence="reverse_kl", top_k=9, temperature=2.0)),
]


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    kd_cases.forbid_parallel_state_getters(setattr)
    tp_group = dist.new_group(list(range(world)))  # explicit, not the default group object

    results = kd_cases.run_all(tp_group, rank, world)
    if world == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
        pair = rank // 2
        for name, case in SUBGROUP_CASES:
            results[f"subgroup/{name}"] = kd_cases.run_case(case, pairs[pair], rank % 2, 2, seed=10 + pair)

    kd_cases.print_worst(results, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
