"""One sentencepiece tokenizer per session for the eval tests (Paul Graham essays + RULER
templates, 2,000 BPE pieces; digits split, so a 7-digit value is 7 tokens)."""
from __future__ import annotations

import pytest

pytest.importorskip("long_context_eval")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from megatron_kd.data import load_tokenizer, train_sentencepiece
    from megatron_kd.eval.haystack import essay_words
    from megatron_kd.eval.ruler.config import templates

    words = essay_words()
    texts = [" ".join(words[i:i + 200]) for i in range(0, 120_000, 200)]
    texts += [t["template"] + t.get("answer_prefix", "") for t in templates().values()] * 50
    path = train_sentencepiece(texts, 2000, tmp_path_factory.mktemp("tok") / "tok")
    return load_tokenizer(path)
