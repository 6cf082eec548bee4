"""In-process KD run that checks the teacher stays frozen (prints one RESULT json line).

    python kd_frozen_worker.py <recipe> <run_dir> [overrides...]
"""
import hashlib
import json
import sys
from pathlib import Path

import torch


def digest(params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main():
    from megatron_kd import distributed
    from megatron_kd.config import load_config
    from megatron_kd.train_specs import register_all
    from megatron_kd.training.loop import Trainer

    recipe, run_dir, *overrides = sys.argv[1:]
    cfg = load_config(recipe, [f"checkpoint.save={run_dir}", *overrides])
    register_all()  # the KD spec (training/registry.py)
    distributed.init_distributed()
    trainer = Trainer(cfg, Path(run_dir)).setup(resume=False, overwrite=True)
    wrapper = trainer.model[0].module
    teacher = list(wrapper.teacher.parameters())
    student = list(wrapper.student.parameters())
    before = digest(teacher), digest(student)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainer.train()
    after = digest(teacher), digest(student)
    print("RESULT " + json.dumps({
        "teacher_unchanged": before[0] == after[0],
        "student_changed": before[1] != after[1],
        "teacher_requires_grad": any(p.requires_grad for p in teacher),
        "teacher_in_optimizer": any(id(p) in optimized for p in teacher),
        "teacher_training_mode": wrapper.teacher.training,
        "student_training_mode": wrapper.student.training,
        "teacher_grads": any(p.grad is not None for p in teacher),
    }), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    main()
