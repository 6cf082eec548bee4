"""Worker for test_plan.py (torchrun, 2 ranks, gloo): builds the tiny model under several layouts
and reports what each rank really holds: parameter elements, and optimizer-state elements after
one (zero-gradient) Adam step. Rank 0 prints one ``RESULT {json}`` line per rank (gathered, so
two ranks' lines cannot interleave in the shared stdout)."""
import json
import sys

import torch


def optimizer_state_elements(opt) -> int:
    total = 0
    for o in getattr(opt, "chained_optimizers", [opt]):
        for state in o.optimizer.state.values():
            total += sum(t.numel() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return total


def main():
    from megatron.core import parallel_state as ps

    from megatron_kd import distributed
    from megatron_kd.config import load_config
    from megatron_kd.models import build_model
    from megatron_kd.training.optimizer import build_optimizer, wrap_ddp

    layouts = json.loads(sys.argv[1])
    distributed.init_distributed()
    out = {"rank": torch.distributed.get_rank(), "layouts": {}}
    for name, overrides in layouts.items():
        cfg = load_config(None, overrides)
        distributed.init_model_parallel(cfg.parallel, seed=3)
        model = build_model(cfg.model, cfg.parallel, vocab_size=500, seq_length=cfg.data.seq_length)
        model.config.calculate_per_token_loss = True
        params = sum(p.numel() for p in model.parameters())
        ddp = wrap_ddp([model], cfg.parallel)
        opt = build_optimizer(ddp, cfg.train, cfg.parallel)
        ddp[0].zero_grad_buffer()
        opt.step()
        out["layouts"][name] = {"pp_rank": ps.get_pipeline_model_parallel_rank(), "params": params,
                                "optimizer_elements": optimizer_state_elements(opt)}
    rows = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rows, out)
    if torch.distributed.get_rank() == 0:
        for row in rows:
            print("RESULT " + json.dumps(row), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    main()
