"""A tiny model trained with the project's own ``train()`` on single-needle NIAH documents (the
passkey needle, 16 one-token colour keys), for the honest end-to-end check: afterwards it must
retrieve the key of unseen prompts through ``megatron-kd eval`` far above chance (1/16).

Model, length, batch, steps and objective are the demo teacher's first curriculum stage (README:
held-out exact match 1.00 at 32 tokens after 250 steps; ``passkey.AnswerObjective``, CE on the
answer key + the mean LM loss). Plain CE did not leave the retrieval plateau at this budget, and
neither did a 64-token, d=64 variant within 75 steps (docs/eval.md). ``python tests/eval/copy_task.py DIR``
builds and trains into DIR (also used by the test)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

LENGTH = 32
NEW_TOKENS = 2
ITERS = 250
RECIPE = """\
model:
  num_layers: 2
  hidden_size: 128
  num_attention_heads: 4
  num_query_groups: 2
  ffn_hidden_size: 384
  rotary_base: 500000
  make_vocab_size_divisible_by: 64
data:
  data_path: {prefix}
  tokenizer_model: {tok}
  seq_length: {length}
  split: "100,0,0"
train:
  micro_batch_size: 32
  global_batch_size: 64
  train_iters: {iters}
  lr: 0.003
  min_lr: 0.0003
  lr_warmup_iters: 10
  log_interval: 25
  eval_interval: 0
  eval_iters: 0
  seed: 1
checkpoint:
  save: {run}
  save_interval: null
"""


def build(root: Path, iters: int = ITERS, docs: int = 8000) -> Path:
    """Tokenizer + indexed dataset + trained run; returns the run directory."""
    from megatron_kd.config import load_config
    from megatron_kd.data import load_tokenizer, preprocess, train_sentencepiece, write_jsonl
    from megatron_kd.eval import passkey
    from megatron_kd.eval.haystack import essay_words
    from megatron_kd.eval.niah import NiahBuilder
    from megatron_kd.training.loop import train

    root.mkdir(parents=True, exist_ok=True)
    words = essay_words()
    texts = [" ".join(words[i:i + 100]) for i in range(0, 60_000, 100)]
    tok_path = train_sentencepiece(texts + passkey.template_texts(3000, key_len=4), 600, root / "tok")
    tok = load_tokenizer(tok_path)
    passkey.check_tokenizer(tok)  # every colour is one token
    builder = NiahBuilder(tok, "passkey", max_new_tokens=2, seed=123)  # other seeds than the eval
    rng = random.Random(0)
    samples = [builder.sample(LENGTH - 1, rng.uniform(0, 100), i) for i in range(docs)]
    prefix = root / "passkey"
    write_jsonl((s.input + " " + s.outputs[0] + "." for s in samples), prefix.with_suffix(".jsonl"))
    preprocess([str(prefix.with_suffix(".jsonl"))], str(prefix), tokenizer_model=tok_path, workers=1,
               progress=False)
    run = root / "run"
    recipe = root / "passkey.yaml"
    recipe.write_text(RECIPE.format(prefix=prefix, tok=tok_path, length=LENGTH, iters=iters, run=run))
    question = tok.encode(samples[0].input)[-9:]  # "What is the pass key? The pass key is"
    assert all(tok.encode(s.input)[-9:] == question for s in samples[:50])
    objective = passkey.AnswerObjective.factory(question, key_len=1, lm_weight=1.0)
    train(load_config(str(recipe)), overwrite=True, objective_factory=objective)
    return run


if __name__ == "__main__":
    import time

    t = time.time()
    print(build(Path(sys.argv[1]), iters=int(sys.argv[2]) if len(sys.argv) > 2 else ITERS), time.time() - t)
