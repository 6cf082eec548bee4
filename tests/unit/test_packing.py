"""Packed windows: documents, positions, masks (packing.py) and the GPTDataset-backed dataset."""
import json
import random

import numpy as np
import pytest
import torch

from megatron_kd.config import DataConfig
from megatron_kd.data import (DataError, build_packed_datasets, document_attention_mask,
                              document_ids_from_tokens, position_ids_from_document_ids, preprocess)

EOS = 2
SEQ = 32


# ---- python-loop references ---------------------------------------------------------------------
def ref_document_ids(tokens, eos):
    out, d = [], 0
    for t in tokens:
        out.append(d)
        d += int(t == eos)
    return out


def ref_reset_positions(doc):
    out, p = [], 0
    for i, d in enumerate(doc):
        p = 0 if i > 0 and d != doc[i - 1] else p
        out.append(p)
        p += 1
    return out


def ref_mask(doc):
    s = len(doc)
    return [[not (doc[i] == doc[j] and j <= i) for j in range(s)] for i in range(s)]


def random_tokens(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(3, 20, (b, s), generator=g)
    t[torch.rand(b, s, generator=g) < 0.15] = EOS
    t[0, 0] = t[0, -1] = EOS  # EOS at both ends
    t[1, 3:6] = EOS  # consecutive EOS: one-token documents
    return t


# ---- pure functions -------------------------------------------------------------------------------
def test_document_and_position_ids_match_reference():
    tokens = random_tokens(4, 50)
    doc = document_ids_from_tokens(tokens, EOS)
    assert doc.dtype == torch.int64 and doc.shape == tokens.shape
    for row_t, row_d in zip(tokens.tolist(), doc.tolist()):
        assert row_d == ref_document_ids(row_t, EOS)
    glob = position_ids_from_document_ids(doc, reset=False)
    assert torch.equal(glob, torch.arange(50).expand(4, 50))
    reset = position_ids_from_document_ids(doc, reset=True)
    assert [ref_reset_positions(r) for r in doc.tolist()] == reset.tolist()
    # unbatched [s] works the same
    assert torch.equal(document_ids_from_tokens(tokens[1], EOS), doc[1])
    assert torch.equal(position_ids_from_document_ids(doc[1], True), reset[1])


def test_document_attention_mask_matches_reference():
    doc = document_ids_from_tokens(random_tokens(3, 24, seed=1), EOS)
    mask = document_attention_mask(doc)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 24, 24)
    for b in range(3):
        assert mask[b, 0].tolist() == ref_mask(doc[b].tolist())
    assert document_attention_mask(doc[0]).shape == (1, 1, 24, 24)
    # one document = plain causal mask
    assert torch.equal(document_attention_mask(torch.zeros(1, 5, dtype=torch.long))[0, 0],
                       ~torch.ones(5, 5, dtype=torch.bool).tril())


# ---- the dataset ----------------------------------------------------------------------------------
WORDS = "the a cat dog runs over big small red blue house tree river city sings eats happy".split()


def make_docs(n, seed=0):
    rng = random.Random(seed)
    # lengths from a few tokens to several windows, so windows both pack and split documents
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 3, 8, 20, 60]))) for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    (d / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(300)))
    preprocess([str(d / "c.jsonl")], str(d / "c"), train_tokenizer=300, progress=False)
    return d


def cfg_for(d, **kw):
    base = dict(data_path=str(d / "c"), tokenizer_model=str(d / "c.tokenizer.model"),
                seq_length=SEQ, split="80,20,0", seed=1234, eod_mask_loss=True)
    return DataConfig(**{**base, **kw})


def stream_and_windows(ds):
    """The dataset's token stream (documents in GPTDataset's document order) and its windows in
    sample (unshuffled) order."""
    gpt = ds.gpt_dataset
    stream = np.concatenate([np.asarray(gpt.dataset[int(i)]) for i in gpt.document_index])
    order = np.argsort(gpt.shuffle_index)
    assert len(order) == len(ds)
    return stream, [ds[int(i)] for i in order]


@pytest.mark.parametrize("reset", [False, True])
def test_windows(data, tmp_path, reset):
    assert not torch.distributed.is_initialized()
    train, valid, test = build_packed_datasets(cfg_for(data, reset_position_ids=reset),
                                               cache_dir=str(tmp_path / "cache"))
    assert test is None and len(train) > 20 and len(valid) > 3
    stream, windows = stream_and_windows(train)
    n = len(windows)
    assert np.array_equal(torch.cat([w["tokens"] for w in windows]).numpy(), stream[: n * SEQ])
    assert np.array_equal(torch.cat([w["labels"] for w in windows]).numpy(), stream[1: n * SEQ + 1])
    saw_split_doc = False
    for w in windows:
        assert {k: (v.shape, v.dtype) for k, v in w.items()} == {
            "tokens": ((SEQ,), torch.int64), "labels": ((SEQ,), torch.int64),
            "loss_mask": ((SEQ,), torch.float32), "document_ids": ((SEQ,), torch.int64),
            "position_ids": ((SEQ,), torch.int64)}
        t, doc = w["tokens"], w["document_ids"]
        assert torch.equal(w["labels"][:-1], t[1:])
        assert doc.tolist() == ref_document_ids(t.tolist(), EOS)
        # a new document starts exactly after an EOS
        assert torch.equal(doc[1:] != doc[:-1], t[:-1] == EOS) and doc[0] == 0
        assert torch.equal(w["loss_mask"], (t != EOS).float())
        want = ref_reset_positions(doc.tolist()) if reset else list(range(SEQ))
        assert w["position_ids"].tolist() == want
        saw_split_doc |= bool((t != EOS).all())
    assert saw_split_doc  # some windows lie inside one long document
    # train and valid draw from disjoint documents
    assert not set(train.gpt_dataset.document_index) & set(valid.gpt_dataset.document_index)


def test_determinism_and_cache(data, tmp_path):
    a = build_packed_datasets(cfg_for(data), cache_dir=str(tmp_path / "a"))[0]
    b = build_packed_datasets(cfg_for(data), cache_dir=str(tmp_path / "b"))[0]
    again = build_packed_datasets(cfg_for(data), cache_dir=str(tmp_path / "a"))[0]  # cache hit
    other = build_packed_datasets(cfg_for(data, seed=7), cache_dir=str(tmp_path / "a"))[0]
    assert len(a) == len(b) == len(again) == len(other)
    for i in range(len(a)):
        assert torch.equal(a[i]["tokens"], b[i]["tokens"])
        assert torch.equal(a[i]["tokens"], again[i]["tokens"])
    assert any(not torch.equal(a[i]["tokens"], other[i]["tokens"]) for i in range(len(a)))
    # asking for more than one epoch adds epochs
    more = build_packed_datasets(cfg_for(data), cache_dir=str(tmp_path / "a"),
                                 num_samples=(3 * len(a), 2, None))[0]
    assert len(more) >= 3 * len(a)


def test_default_cache_next_to_data_and_stale_cache(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(120)))
    preprocess([str(tmp_path / "c.jsonl")], str(tmp_path / "c"), train_tokenizer=300, progress=False)
    first = build_packed_datasets(cfg_for(tmp_path))[0]
    assert (tmp_path / "c_cache").is_dir()
    # re-preprocess other text to the same prefix: the cached indices must not be reused
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(150, seed=5)))
    preprocess([str(tmp_path / "d.jsonl")], str(tmp_path / "c"),
               tokenizer_model=str(tmp_path / "c.tokenizer.model"), overwrite=True, progress=False)
    second = build_packed_datasets(cfg_for(tmp_path))[0]
    stream, windows = stream_and_windows(second)
    assert np.array_equal(torch.cat([w["tokens"] for w in windows]).numpy(), stream[: len(windows) * SEQ])
    assert len(second) != len(first)


def test_bad_inputs(data, tmp_path):
    with pytest.raises(DataError, match="data.data_path .*nope"):
        build_packed_datasets(cfg_for(data, data_path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="data.tokenizer_model"):
        build_packed_datasets(cfg_for(data, tokenizer_model=None))
    with pytest.raises(DataError, match=r"data.split='99.9,0.1,0'.*valid split.*data.seq_length"):
        build_packed_datasets(cfg_for(data, split="99.9,0.1,0"), cache_dir=str(tmp_path))
    from megatron_kd.data import train_sentencepiece
    other = train_sentencepiece(make_docs(100), 280, tmp_path / "other")
    with pytest.raises(DataError, match=r"vocab_size=28\d.*tokenized with vocab_size=300"):
        build_packed_datasets(cfg_for(data, tokenizer_model=other), cache_dir=str(tmp_path))


def test_works_with_torch_distributed_initialised(data, tmp_path):
    """With a process group, BlendedMegatronDatasetBuilder builds on rank 0 first, then barriers."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        train = build_packed_datasets(cfg_for(data), cache_dir=str(tmp_path / "c"))[0]
    finally:
        dist.destroy_process_group()
    ref = build_packed_datasets(cfg_for(data), cache_dir=str(tmp_path / "d"))[0]
    assert len(train) == len(ref) and torch.equal(train[5]["tokens"], ref[5]["tokens"])
