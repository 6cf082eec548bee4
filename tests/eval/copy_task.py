"""A tiny model trained with the project's own ``train()`` on RULER niah_single_1 documents
(prompt + answer), for the honest end-to-end check: after training it must retrieve the 7-digit
value of unseen prompts far above chance (chance of an exact 7-digit match ~ 1e-7).

``python tests/eval/copy_task.py DIR`` builds and trains into DIR (also used by the test)."""
from __future__ import annotations

import sys
from pathlib import Path

LENGTH = 160
NEW_TOKENS = 8
ITERS = 300  # ~770k tokens: ~60 s on one idle core
RECIPE = """\
model:
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  num_query_groups: 2
  ffn_hidden_size: 192
  rotary_base: 10000
  make_vocab_size_divisible_by: 64
data:
  data_path: {prefix}
  tokenizer_model: {tok}
  seq_length: {length}
  split: "100,0,0"
train:
  micro_batch_size: 16
  global_batch_size: 16
  train_iters: {iters}
  lr: 0.005
  min_lr: 0.0005
  lr_warmup_iters: 20
  log_interval: 50
  eval_interval: 0
  eval_iters: 0
  seed: 1
checkpoint:
  save: {run}
  save_interval: null
"""


class _CharTokenizer:
    """Sizing stand-in before the real tokenizer exists: one token per 3 characters."""

    def encode(self, text):
        return list(range(len(text) // 3))


def build(root: Path, iters: int = ITERS, docs: int = 1500, answer_weighted: bool = False) -> Path:
    """Tokenizer + indexed dataset + trained run; returns the run directory."""
    from megatron_kd.config import load_config
    from megatron_kd.data import load_tokenizer, preprocess, train_sentencepiece, write_jsonl
    from megatron_kd.eval import ruler
    from megatron_kd.training.loop import train

    root.mkdir(parents=True, exist_ok=True)
    rough = ruler.generate("niah_single_1", _CharTokenizer(), 3 * LENGTH, 300, seed=7, max_new_tokens=8)
    tok_path = train_sentencepiece([s.input + " " + s.outputs[0] + "." for s in rough], 1000, root / "tok")
    tok = load_tokenizer(tok_path)
    train_docs = ruler.generate("niah_single_1", tok, LENGTH - 1, docs, seed=11, max_new_tokens=NEW_TOKENS)
    prefix = root / "copy"
    write_jsonl((s.input + " " + s.outputs[0] + "." for s in train_docs), prefix.with_suffix(".jsonl"))
    preprocess([str(prefix.with_suffix(".jsonl"))], str(prefix), tokenizer_model=tok_path, workers=1,
               progress=False)
    run = root / "run"
    recipe = root / "copy.yaml"
    recipe.write_text(RECIPE.format(prefix=prefix, tok=tok_path, length=LENGTH, iters=iters, run=run))
    factory = None
    if answer_weighted:
        factory = _answer_objective(tok, train_docs)
    train(load_config(str(recipe)), overwrite=True, objective_factory=factory)
    return run


def _answer_objective(tok, docs):
    """The demo teacher's objective (answer-token CE + the mean LM loss), pointed at the answer
    after RULER's answer prefix: the prompt's last tokens are the same in every document."""
    from megatron_kd.eval.passkey import AnswerObjective

    prompts = [tok.encode(d.input) for d in docs[:50]]
    q = prompts[0][-4:]
    assert all(p[-4:] == q for p in prompts), "answer prefixes tokenize differently"
    full = tok.encode(docs[0].input + " " + docs[0].outputs[0] + ".")
    key_len = len(full) - len(prompts[0]) - 1  # the value's tokens, without the period
    return AnswerObjective.factory(q, key_len, lm_weight=1.0)


if __name__ == "__main__":
    import time

    t = time.time()
    print(build(Path(sys.argv[1]), iters=int(sys.argv[2]) if len(sys.argv) > 2 else ITERS), time.time() - t)
