"""One process, tiny models (TP=PP=1): the LongReD model checks that need megatron-core.

Prints ``RESULT <json>``; test_longred_model.py asserts on it. Run in a subprocess so the
process-global torch.distributed / parallel_state never leak into other tests.
"""
import dataclasses
import json
import sys

import torch


def main():
    from megatron_kd import distributed
    from megatron_kd.config import ModelConfig, ParallelConfig
    from megatron_kd.longred.layer_select import measure_drift, top_layers
    from megatron_kd.longred.losses import attention_probs
    from megatron_kd.longred.model import LongReDModel, layer_report_name
    from megatron_kd.longred.positions import skipped_position_ids
    from megatron_kd.models import build_model
    from megatron_kd.models.attention import attention_mask

    torch.set_num_threads(1)
    distributed.init_distributed()
    distributed.init_model_parallel(ParallelConfig(), seed=7)
    V, S, B, N = 128, 32, 2, 4
    cfg = ModelConfig(num_layers=N, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=128, rotary_base=10000, make_vocab_size_divisible_by=128)

    def model(c=cfg):
        return build_model(c, ParallelConfig(), V, 4 * S).eval()

    torch.manual_seed(0)
    teacher = model()
    student = model()
    student.load_state_dict(teacher.state_dict())
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, V, (B, S), generator=g)
    docs = torch.zeros(B, S, dtype=torch.long)
    docs[:, S // 2:] = 1  # two documents per window: the mask matters
    pos = torch.arange(S).expand(B, S).clone()
    mask = attention_mask(docs)
    out = {}

    def run(m, stream, student_pos, teacher_pos):
        m.reports.clear()
        with torch.no_grad():
            m(tokens, student_pos, mask, stream=stream, teacher_position_ids=teacher_pos)
        return {k: float(v[0] / v[1]) for k, v in m.reports.items() if v[1] > 0}

    # 1. identical student and teacher at the same positions: every LongReD loss is zero
    same = LongReDModel(student, teacher, list(range(1, N + 1)), N, 5.0, 10.0)
    short = run(same, "short", pos, pos)
    out["short_same"] = max(short[layer_report_name("short", i)] for i in range(1, N + 1))
    out["s2l_same"] = run(same, "s2l", pos, pos)[layer_report_name("s2l", N)]
    # ... and not zero when the student sees skipped positions (the test can fail)
    skipped = torch.stack([skipped_position_ids(S, 4 * S, 0, i, "uniform") for i in range(B)])
    out["s2l_skipped"] = run(same, "s2l", skipped, pos)[layer_report_name("s2l", N)]
    # ... nor when the student's rotary base differs
    ext = model(dataclasses.replace(cfg, rotary_base=40000))
    ext.load_state_dict(teacher.state_dict())
    other = LongReDModel(ext, teacher, list(range(1, N + 1)), N, 5.0, 10.0)
    short = run(other, "short", pos, pos)
    out["short_theta"] = min(short[layer_report_name("short", i)] for i in range(1, N + 1))

    # 2. attention probabilities recomputed from q, k equal the local spec's own softmax output
    attn = teacher.decoder.layers[1].self_attention.core_attention
    seen = {}
    h1 = attn.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("mine", attention_probs(args[0], args[1], args[3], mod.softmax_scale)))
    h2 = attn.scale_mask_softmax.register_forward_hook(lambda mod, args, o: seen.__setitem__("local", o))
    with torch.no_grad():
        teacher(tokens, pos, mask)
    h1.remove(), h2.remove()
    out["probs_max_diff"] = float((seen["mine"] - seen["local"].float()).abs().max())
    out["probs_shape"] = list(seen["mine"].shape)
    p = seen["mine"]
    out["probs_row_sum_err"] = float((p.sum(-1) - 1).abs().max())
    # a query in the second document puts no weight on the first one (document mask), nor ahead
    out["probs_cross_doc"] = float(p[:, :, S // 2:, : S // 2].abs().max())
    out["probs_future"] = float(p.triu(1).abs().max())

    # 3. selection: perturb one layer's query projection on purpose; attention KL must pick it
    results = {}
    for target in (2, 3):
        pert = model()
        pert.load_state_dict(teacher.state_dict())
        qkv = pert.decoder.layers[target - 1].self_attention.linear_qkv.weight
        with torch.no_grad():
            qkv.mul_(1.0 + 0.5 * torch.randn(qkv.shape, generator=g))
        m = LongReDModel(pert, teacher, [], N, 5.0, 10.0)
        batches = [{"tokens": tokens, "position_ids": pos, "document_ids": docs}]
        table = measure_drift(m, batches)
        results[target] = {"picked": top_layers({k: v["attention_kl"] for k, v in table.items()}, 1),
                           "kl": {k: v["attention_kl"] for k, v in table.items()},
                           "below_cos": min(v["hidden_cos"] for k, v in table.items() if k < target),
                           "first_changed_cos": table[target]["hidden_cos"]}
    out["selection"] = results
    distributed.destroy()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
