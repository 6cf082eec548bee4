"""Fixtures for the LongReD tests: the tiny corpus (400 hotpotqa paragraphs, vocab 500)."""
import pytest


@pytest.fixture(scope="session")
def longred_data(tmp_path_factory):
    from megatron_kd.data import iter_offline_corpus, preprocess, write_jsonl

    root = tmp_path_factory.mktemp("longred_data")
    write_jsonl(iter_offline_corpus("hotpotqa", max_docs=400), root / "corpus.jsonl")
    preprocess([str(root / "corpus.jsonl")], str(root / "corpus"), train_tokenizer=500, workers=1,
               progress=False)
    return root / "corpus"
