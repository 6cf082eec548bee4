"""A tiny model trained with the project's own ``train()`` for the honest end-to-end check: it
must then retrieve the key of unseen ``niah_passkey`` prompts (Paul Graham haystack, passkey
needle, 16 one-token colour keys) through ``megatron-kd eval`` far above chance (1/16).

Data, model, length, batch, steps and objective are the demo teacher's first curriculum stage
(README: held-out exact match 1.00 at 32 tokens after 250 steps): passkey documents with the
question asked 1-4 times, ``passkey.AnswerObjective`` (CE on the answer key + the mean LM loss).
Plain CE on RULER niah_single_1 documents did not leave the retrieval plateau at this budget
(docs/eval.md). ``python tests/eval/copy_task.py DIR`` builds and trains into DIR."""
from __future__ import annotations

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


def build(root: Path, iters: int = ITERS, docs: int = 17600) -> Path:
    """Tokenizer + indexed dataset + trained run; returns the run directory."""
    from megatron_kd.config import load_config
    from megatron_kd.data import load_tokenizer, preprocess, train_sentencepiece, write_jsonl
    from megatron_kd.eval import passkey
    from megatron_kd.eval.haystack import essay_words
    from megatron_kd.run import train

    root.mkdir(parents=True, exist_ok=True)
    words = essay_words()
    texts = [" ".join(words[i:i + 100]) for i in range(0, 60_000, 100)]
    tok_path = train_sentencepiece(texts + passkey.template_texts(3000, key_len=4), 600, root / "tok")
    tok = load_tokenizer(tok_path)
    passkey.check_tokenizer(tok)  # every colour is one token
    # the demo teacher's training documents (passkey.PasskeyGenerator, question asked 1-4 times),
    # filler from the essays: the same sentence format as the niah_passkey prompts it is tested on
    gen = passkey.PasskeyGenerator(tok, texts, seed=123, key_len=1)
    fit = (LENGTH - 1 - gen.overhead()) // gen.qa_tokens() + 1
    docs_text = [gen.passkey_doc(LENGTH - 1, questions=gen.rng.randint(1, max(1, min(4, fit)))).text
                 for _ in range(docs)]
    prefix = root / "passkey"
    write_jsonl(docs_text, prefix.with_suffix(".jsonl"))
    preprocess([str(prefix.with_suffix(".jsonl"))], str(prefix), tokenizer_model=tok_path, workers=1,
               progress=False)
    run = root / "run"
    recipe = root / "passkey.yaml"
    recipe.write_text(RECIPE.format(prefix=prefix, tok=tok_path, length=LENGTH, iters=iters, run=run))
    objective = passkey.AnswerObjective.factory(gen.question_ids(), key_len=1, lm_weight=1.0)
    train(load_config(str(recipe)), overwrite=True, objective_factory=objective)
    return run


if __name__ == "__main__":
    import time

    t = time.time()
    print(build(Path(sys.argv[1]), iters=int(sys.argv[2]) if len(sys.argv) > 2 else ITERS), time.time() - t)
