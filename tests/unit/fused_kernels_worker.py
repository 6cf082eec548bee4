"""Run with a fake ``apex`` first on PYTHONPATH: what megatron-core picks by import name, what
fused_kernels detects by capability, and whether RMSNorm / LayerNorm models build on the CPU.
Prints ``RESULT {json}``."""
import json
import warnings

warnings.filterwarnings("ignore")


def main():
    import torch

    from megatron_kd import distributed, fused_kernels
    from megatron_kd.config import ModelConfig, ParallelConfig
    from megatron_kd.models import build_model

    distributed.init_distributed()
    distributed.init_model_parallel(ParallelConfig(), seed=0)
    from megatron.core import optimizer as mopt
    from megatron.core.models.gpt import gpt_layer_specs

    probe = fused_kernels.probe_apex()
    out = {"megatron_have_apex": gpt_layer_specs.HAVE_APEX, "megatron_adam": mopt.Adam.__module__,
           "fused_adam": probe.fused_adam, "fused_layer_norm": probe.fused_layer_norm, "reason": probe.reason,
           "line": fused_kernels.startup_line("RMSNorm")}
    for norm in ("RMSNorm", "LayerNorm"):
        model = build_model(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, normalization=norm),
                            ParallelConfig(), vocab_size=64, seq_length=8)
        out[norm] = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        with torch.no_grad():
            logits = model(torch.zeros(1, 8, dtype=torch.long), torch.arange(8)[None], None)
        out[norm + "_finite"] = bool(torch.isfinite(logits).all())
    out["adam_after_check"] = fused_kernels.check_megatron_adam()
    try:
        fused_kernels.require_apex("the test")
        out["require"] = "ok"
    except RuntimeError as e:
        out["require"] = str(e)
    print("RESULT " + json.dumps(out), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    main()
