"""Run under torchrun (1 or 2 ranks): load a converted run directory as a *teacher* (the KD
path), forward a token window, gather the vocab-parallel logits and compare with transformers'
logits of the original HF model on the same tokens. Prints ``RESULT {json}`` on rank 0.

argv: RUN_DIR HF_DIR SEQ_LEN [greedy_steps]
"""
import dataclasses
import json
import sys

import torch


def our_logits(chunks, tokens, vocab):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_kd.data.packing import document_attention_mask

    pos = torch.arange(tokens.shape[1]).unsqueeze(0)
    with torch.no_grad():
        out = chunks[0](tokens, pos, document_attention_mask(torch.zeros_like(tokens)))  # [b, s, V/tp]
        out = gather_from_tensor_model_parallel_region(out)
    return out[..., :vocab].float()


def main():
    run_dir, hf_dir, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    # transformers first: platform.setup()'s CPU device mapping (init_distributed) corrupts the
    # non-persistent RoPE buffers transformers 5 materialises in from_pretrained.
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    vocab_rows = hf.config.vocab_size
    if len(sys.argv) > 5:
        tokens = torch.tensor([json.loads(sys.argv[5])])
    else:
        tokens = torch.randint(1, vocab_rows, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        ctx_hf = tokens.clone()
        for _ in range(steps):  # no-cache greedy: the whole prefix every step
            ctx_hf = torch.cat([ctx_hf, hf(ctx_hf).logits[:, -1].argmax(-1, keepdim=True)], 1)
    del hf

    from megatron_kd import distributed
    from megatron_kd.config import TeacherConfig, load_config
    from megatron_kd.data import load_tokenizer
    from megatron_kd.kd.teacher import build_teacher_chunks

    distributed.init_distributed()
    tp = torch.distributed.get_world_size()
    cfg = load_config(f"{run_dir}/config.yaml", [f"parallel.tensor_model_parallel_size={tp}"])
    cfg.teacher = TeacherConfig(**dataclasses.asdict(cfg.model), load=run_dir)
    cfg.data.seq_length = seq
    distributed.init_model_parallel(cfg.parallel, seed=1)
    vocab = load_tokenizer(cfg.data.tokenizer_model).vocab_size
    chunks = build_teacher_chunks(cfg, vocab)
    ref = ref[..., :vocab]
    ours = our_logits(chunks, tokens, vocab)
    diff = (ours - ref).abs()
    result = {"tp": tp, "max_abs_diff": diff.max().item(), "max_abs_logit": ref.abs().max().item(),
              "argmax_agree": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
              "seq": tokens.shape[1]}
    if steps:
        ctx_ours = tokens.clone()
        for _ in range(steps):
            nxt = our_logits(chunks, ctx_ours, vocab)[:, -1].argmax(-1, keepdim=True)
            ctx_ours = torch.cat([ctx_ours, nxt], 1)
        result["greedy_ours"] = ctx_ours[0, tokens.shape[1]:].tolist()
        result["greedy_hf"] = ctx_hf[0, tokens.shape[1]:].tolist()
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    main()
