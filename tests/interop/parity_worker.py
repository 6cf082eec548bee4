"""Run under torchrun (1 or 2 ranks): load converted run directories as *teachers* (the KD
path), forward a token window, gather the vocab-parallel logits and compare with transformers'
logits of the original HF model on the same tokens. Prints ``RESULT {json}`` on rank 0.

argv: CASES_JSON [tp|ep] -- a list of {"name", "run", "hf", "seq", "steps" (greedy tokens,
optional), "tokens" (optional list; default random)}; the world is TP (default) or, with ``ep``,
expert parallelism (TP=1, the MoE experts split over the ranks).
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


def hf_reference(case):
    """transformers' logits (and no-cache greedy continuation) for one case."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32).eval()
    if case.get("tokens"):
        tokens = torch.tensor([case["tokens"]])
    else:
        tokens = torch.randint(1, hf.config.vocab_size, (1, case["seq"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        ctx = tokens.clone()
        for _ in range(case.get("steps", 0)):  # the whole prefix every step
            ctx = torch.cat([ctx, hf(ctx).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens, ref, ctx[0, tokens.shape[1]:].tolist()


def check(case, tokens, ref, greedy_hf, layout="tp"):
    from megatron_kd import distributed
    from megatron_kd.config import TeacherConfig, load_config
    from megatron_kd.data import load_tokenizer
    from megatron_kd.kd.teacher import build_teacher_chunks

    world = torch.distributed.get_world_size()
    tp = world if layout == "tp" else 1
    cfg = load_config(f"{case['run']}/config.yaml", [f"parallel.tensor_model_parallel_size={tp}",
                                                     f"parallel.expert_model_parallel_size={world // tp}"])
    cfg.teacher = TeacherConfig(**dataclasses.asdict(cfg.model), load=case["run"])
    cfg.data.seq_length = tokens.shape[1]
    distributed.init_model_parallel(cfg.parallel, seed=1)
    vocab = load_tokenizer(cfg.data.tokenizer_model).vocab_size
    chunks = build_teacher_chunks(cfg, vocab)
    ref = ref[..., :vocab]
    ours = our_logits(chunks, tokens, vocab)
    diff = (ours - ref).abs()
    result = {"tp": tp, "ep": world // tp, "max_abs_diff": diff.max().item(), "max_abs_logit": ref.abs().max().item(),
              "argmax_agree": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
              "seq": tokens.shape[1]}
    aware = [m for c in chunks for m in c.modules() if hasattr(m, "chunk_size") and hasattr(m, "temperature")]
    for attr in ("chunk_size", "temperature"):  # each Llama-4 piece must matter on this input
        saved = [getattr(m, attr) for m in aware]
        if any(v is not None for v in saved):
            for m in aware:
                setattr(m, attr, None)
            result[f"diff_without_{attr}"] = (our_logits(chunks, tokens, vocab) - ref).abs().max().item()
            for m, v in zip(aware, saved):
                setattr(m, attr, v)
    if greedy_hf:
        ctx = tokens.clone()
        for _ in greedy_hf:
            ctx = torch.cat([ctx, our_logits(chunks, ctx, vocab)[:, -1].argmax(-1, keepdim=True)], 1)
        result["greedy_ours"] = ctx[0, tokens.shape[1]:].tolist()
        result["greedy_hf"] = greedy_hf
    return result


def main():
    cases = json.loads(open(sys.argv[1]).read())
    # transformers first, then torch.distributed: the references never share a process group
    refs = [hf_reference(c) for c in cases]
    from megatron_kd import distributed

    distributed.init_distributed()
    layout = sys.argv[2] if len(sys.argv) > 2 else "tp"
    results = {c["name"]: check(c, *r, layout=layout) for c, r in zip(cases, refs)}
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    main()
