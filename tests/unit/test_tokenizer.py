"""Tokenizer loading/training: sentencepiece and HF tokenizer.json behind one interface."""
import random
from pathlib import Path

import pytest

from megatron_kd.data import DataError, load_tokenizer, train_sentencepiece

WORDS = ("the a cat dog runs over under quickly slowly big small red blue house tree river "
         "mountain city sings jumps eats sleeps happy sad café naïve 日本 zoo 42 1999").split()


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "."
            for _ in range(n)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(sentences(400), 400, tmp_path_factory.mktemp("tok") / "sp")


def test_train_and_load_sentencepiece(sp_model):
    assert sp_model.endswith("sp.model") and Path(sp_model).is_file()
    tok = load_tokenizer(sp_model)
    assert 260 <= tok.vocab_size <= 400
    assert (tok.eos_id, tok.bos_id) == (2, 1)
    assert tok.path == sp_model
    # identity normalisation + byte fallback: exact round trip, even for unseen characters
    for text in ["The cat runs.", "  two  spaces\n\nand a newline ", "ünïcödé Ω ≈ 🙂", "\tx", ""]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.eos_id not in tok.encode("The cat runs.")


def test_train_from_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n".join(sentences(300, seed=1)))
    tok = load_tokenizer(train_sentencepiece([f], 400, tmp_path / "out" / "sp"))
    assert tok.decode(tok.encode("Big red house.")) == "Big red house."
    with pytest.raises(DataError, match="missing.txt"):
        train_sentencepiece([tmp_path / "missing.txt"], 300, tmp_path / "x")


def test_train_rejects_bad_input(tmp_path):
    with pytest.raises(DataError, match="--train-tokenizer"):
        train_sentencepiece(sentences(10), 100, tmp_path / "sp")
    with pytest.raises(DataError, match="no non-empty text"):
        train_sentencepiece(["", "  \n"], 300, tmp_path / "sp")
    # 256 byte pieces + specials + every character must fit
    with pytest.raises(DataError, match="--train-tokenizer 261.*vocab"):
        train_sentencepiece(sentences(50), 261, tmp_path / "sp")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(DataError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="bad.model"):
        load_tokenizer(bad)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(DataError, match="neither"):
        load_tokenizer(tmp_path)


def _hf_tokenizer(path, specials):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(200), trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_json(tmp_path):
    path = _hf_tokenizer(tmp_path / "tokenizer.json", ["<|begin_of_text|>", "<|end_of_text|>"])
    for p in (path, tmp_path):  # a directory holding tokenizer.json works too
        tok = load_tokenizer(p)
        assert (tok.bos_id, tok.eos_id) == (0, 1)
        assert tok.vocab_size == 300
        assert tok.decode(tok.encode("Big red café.")) == "Big red café."


def test_hf_tokenizer_without_eos(tmp_path):
    path = _hf_tokenizer(tmp_path / "t.json", ["<pad>"])
    with pytest.raises(DataError, match=r"t\.json.*no EOS"):
        load_tokenizer(path)
