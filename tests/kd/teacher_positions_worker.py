"""Worker for test_teacher_positions.py (one rank; prints one RESULT JSON line).

The position-invariant teacher control (teacher.reset_position_ids): the data layer adds
per-document ``teacher_position_ids`` (cp_layout.with_teacher_positions), the KD objective hands
them to DistillationModel, which rotates the *teacher* with them and the student with the global
ones. Measured for a RoPE-only teacher (offset-invariant under the document mask: KD targets equal
up to rounding) and a teacher with Llama-4 NoPE temperature tuning (absolute position reaches its
logits: the targets move), on the exact and the fused loss path.
"""
import json

import torch


def main():
    from megatron.core import parallel_state as ps

    from megatron_kd import distributed
    from megatron_kd.config import KDConfig, ModelConfig, ParallelConfig
    from megatron_kd.data.cp_layout import with_teacher_positions
    from megatron_kd.data.packing import (document_attention_mask, document_ids_from_tokens,
                                          position_ids_from_document_ids)
    from megatron_kd.kd.distill_model import DistillationModel
    from megatron_kd.models import build_model

    distributed.init_distributed()
    parallel = ParallelConfig()
    distributed.init_model_parallel(parallel, seed=5)
    seq, vocab, eos = 96, 256, 1
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                 make_vocab_size_divisible_by=64, rotary_base=500000)
    lengths = [30, 9, 41, 16]
    tokens = torch.randint(2, vocab, (2, seq), generator=torch.Generator().manual_seed(3))
    tokens[:, torch.tensor(lengths).cumsum(0) - 1] = eos
    docs = document_ids_from_tokens(tokens, eos)
    batch = {"tokens": tokens, "document_ids": docs, "position_ids": position_ids_from_document_ids(docs, False)}
    batch = next(with_teacher_positions(iter([batch])))
    reset = position_ids_from_document_ids(docs, True)
    labels = torch.roll(tokens, -1, 1)
    loss_mask = (tokens != eos).float()
    mask = document_attention_mask(docs)
    student = build_model(ModelConfig(**shape), parallel, vocab, seq).eval()
    out = {"teacher_ids_are_reset": bool(torch.equal(batch["teacher_position_ids"], reset))}
    for name, extra in (("rope", {}), ("positional", dict(no_rope_freq=2, attn_temperature_tuning=True,
                                                          attn_temperature_floor_scale=4,
                                                          attn_temperature_scale=0.5))):
        # a sharper (larger-init) teacher: attention far from uniform, so a q scale matters
        teacher = build_model(ModelConfig(**shape, **extra, init_method_std=0.2), parallel, vocab, seq)
        res = {}
        for fused in (False, True):
            pair = DistillationModel(student, teacher, KDConfig(alpha=0.5), vocab,
                                     ps.get_tensor_model_parallel_group(), fused=fused)
            with torch.no_grad():
                glob = pair(tokens, batch["position_ids"], mask, labels=labels, loss_mask=loss_mask)
                t_glob = teacher.applied_position_ids.clone()
                rst = pair(tokens, batch["position_ids"], mask, labels=labels, loss_mask=loss_mask,
                           teacher_position_ids=batch["teacher_position_ids"])
                t_rst = teacher.applied_position_ids.clone()
                s_rst = student.applied_position_ids.clone()
            if fused:
                res["fused_loss"] = [glob[0].item(), rst[0].item()]
            else:
                kd_g, kd_r = glob[..., 0], rst[..., 0]
                res["kd_max_diff"] = (kd_g - kd_r).abs().max().item()
                res["kd_mean"] = kd_g.mean().item()
                res["exact_loss"] = [((0.5 * kd_g + 0.5 * glob[..., 1]) * loss_mask).sum().item(),
                                     ((0.5 * kd_r + 0.5 * rst[..., 1]) * loss_mask).sum().item()]
                res["teacher_saw_global"] = bool(torch.equal(t_glob, batch["position_ids"]))
                res["teacher_saw_reset"] = bool(torch.equal(t_rst, reset))
                res["student_saw_global"] = bool(torch.equal(s_rst, batch["position_ids"]))
        out[name] = res
    print("RESULT " + json.dumps(out), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    main()
