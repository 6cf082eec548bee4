"""Fixtures for the multi-rank tests: one tiny corpus, tokenizer and recipe per session."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

# Tiny model; vocab: sentencepiece 500 -> padded 512 at TP=1 (multiple of 128) and at TP=2
# (multiple of 256), so every layout holds the same embedding table.
RECIPE = """\
model:
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 4
  num_query_groups: 2
  ffn_hidden_size: 128
  make_vocab_size_divisible_by: 128
data:
  data_path: {prefix}
  tokenizer_model: {prefix}.tokenizer.model
  seq_length: 64
  split: "90,10,0"
train:
  micro_batch_size: 2
  global_batch_size: 8
  train_iters: 4
  lr: 0.003
  min_lr: 0.0003
  lr_warmup_iters: 1
  log_interval: 1
  eval_interval: 1
  eval_iters: 1
"""


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """<dir>/corpus.{bin,idx,tokenizer.model} from 400 hotpotqa paragraphs, vocab 500."""
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_recipe(tiny_data, tmp_path_factory):
    return write_tiny_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml", tiny_data)


def make_tiny_data(root: Path) -> Path:
    """Plain function (benchmarks/fault_stress.py builds the same corpus outside pytest)."""
    from megatron_kd.data import iter_offline_corpus, preprocess, write_jsonl

    write_jsonl(iter_offline_corpus("hotpotqa", max_docs=400), root / "corpus.jsonl")
    summary = preprocess([str(root / "corpus.jsonl")], str(root / "corpus"), train_tokenizer=500,
                         workers=1, progress=False)
    assert summary["vocab_size"] == 500
    return root / "corpus"


def write_tiny_recipe(path: Path, prefix: Path) -> Path:
    path.write_text(textwrap.dedent(RECIPE.format(prefix=prefix)))
    return path
