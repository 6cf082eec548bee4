"""Write a tiny *training run directory* with random weights: what `analyze` reads from a real run.

    python make_tiny_run.py OUT_DIR [rotary_base] [seed] [llama4]

``llama4``: Llama-4's position-dependent pieces too (every 2nd layer NoPE with attention
temperature tuning, floor scale 8; chunked attention of 16 on the RoPE layers; QK L2 norm).

config.yaml (RunConfig) + a sentencepiece tokenizer trained on the Paul Graham essays + a sharded
megatron-core checkpoint of a freshly initialised 2-layer model (single rank), in the layout
training/checkpointing.py reads. Vocab 384 pads to 384 at TP=1 and TP=2 (same embedding table).
"""
import sys
from pathlib import Path

from megatron_kd import distributed
from megatron_kd.config import dump_config, from_dict
from megatron_kd.training.checkpointing import LATEST, iteration_dir


def main():
    out = Path(sys.argv[1])
    theta = float(sys.argv[2]) if len(sys.argv) > 2 else 10000.0
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1234
    llama4 = len(sys.argv) > 4 and sys.argv[4] == "llama4"
    tok_dir = out.parent / "tokenizer"
    if not (tok_dir / "sp.model").is_file():
        from megatron_kd.analysis.probe import default_text
        from megatron_kd.data import train_sentencepiece

        text = default_text()[:200_000]
        train_sentencepiece([p for p in text.split("\n") if p.strip()], 384, tok_dir / "sp")
    model = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
             "ffn_hidden_size": 128, "rotary_base": theta, "make_vocab_size_divisible_by": 64}
    if llama4:
        model.update(no_rope_freq=2, attn_temperature_tuning=True, attn_temperature_floor_scale=8,
                     attn_temperature_scale=0.5, attention_chunk_size=16, qk_l2_norm=True)
    cfg = from_dict({
        "model": model,
        "data": {"tokenizer_model": str(tok_dir / "sp.model"), "seq_length": 128},
        "train": {"seed": seed},
    })
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")

    from megatron.core import dist_checkpointing

    from megatron_kd.config import ParallelConfig
    from megatron_kd.data import load_tokenizer
    from megatron_kd.models import build_model

    distributed.init_distributed()
    distributed.init_model_parallel(ParallelConfig(), seed)
    model = build_model(cfg.model, ParallelConfig(), load_tokenizer(cfg.data.tokenizer_model).vocab_size, 128)
    ckpt = iteration_dir(out / "checkpoints", 1)
    ckpt.mkdir()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(ckpt))
    (out / "checkpoints" / LATEST).write_text("1\n")
    distributed.destroy()
    print("RUN", out)


if __name__ == "__main__":  # dist_checkpointing spawns helpers that re-import __main__
    main()
