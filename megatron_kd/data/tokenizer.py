"""Tokenizer loading and training.

One small interface (``vocab_size``, ``eos_id``, ``bos_id``, ``encode``, ``decode``, ``path``) over
sentencepiece ``.model`` files and HF ``tokenizer.json`` files, so preprocessing, packing and the
teacher/student vocabulary check do not care which library made the tokenizer.
"""
from __future__ import annotations

import abc

import os
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Union

from megatron_kd.data.errors import DataError

# Names under which HF tokenizers store their end-of-document / begin-of-document tokens.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")

# sentencepiece trains on at most this much text: enough for a small BPE vocabulary, and fast.
MAX_TRAIN_BYTES = 10 * 1024 * 1024


class Tokenizer(abc.ABC):
    """Common interface; ``vocab_size`` is the true size (megatron pads it later)."""

    path: str
    vocab_size: int
    eos_id: int
    bos_id: Optional[int]

    @abc.abstractmethod
    def encode(self, text: str) -> List[int]:
        ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        ...

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, bos_id={self.bos_id})")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = str(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise DataError(f"tokenizer {self.path}: not a readable sentencepiece model ({e})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        eos = self._sp.eos_id()
        if eos < 0:
            raise DataError(f"tokenizer {self.path}: sentencepiece model has no EOS id (train with eos_id >= 0)")
        self.eos_id = int(eos)
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HF

        self.path = str(path)
        try:
            self._tok = _HF.from_file(self.path)
        except Exception as e:
            raise DataError(f"tokenizer {self.path}: not a readable HF tokenizer.json ({e})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = self._first_id(EOS_NAMES)
        if self.eos_id is None:
            raise DataError(f"tokenizer {self.path}: no EOS token; expected one of {', '.join(EOS_NAMES)}")
        self.bos_id = self._first_id(BOS_NAMES)

    def _first_id(self, names) -> Optional[int]:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: Union[str, Path]) -> Tokenizer:
    """Load ``*.json`` as HF tokenizers, anything else as sentencepiece; a directory may hold
    ``tokenizer.json`` or ``tokenizer.model``."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise DataError(f"tokenizer {path}: directory holds neither tokenizer.json nor tokenizer.model")
    if not p.is_file():
        raise DataError(f"tokenizer {path}: file not found (expected a sentencepiece .model or a tokenizer.json)")
    return HFTokenizer(str(p)) if p.suffix == ".json" else SentencePieceTokenizer(str(p))


def _training_lines(source: Iterable[str], max_bytes: int):
    """Lines (sentencepiece trains on lines) from texts (``str``) or files (``pathlib.Path``)."""
    budget = max_bytes
    for item in source:
        if isinstance(item, Path):
            if not item.is_file():
                raise DataError(f"tokenizer training input {item}: file not found")
            with open(item, encoding="utf-8", errors="replace") as f:
                text = f.read(budget)
        else:
            text = item
        for line in text.splitlines():
            if not line.strip():
                continue
            line = line[:budget]
            budget -= len(line.encode("utf-8")) + 1
            yield line
            if budget <= 0:
                return


def train_sentencepiece(texts_or_files: Iterable[Union[str, Path]], vocab_size: int,
                        out_prefix: Union[str, Path], max_bytes: int = MAX_TRAIN_BYTES) -> str:
    """Train a BPE sentencepiece model on texts (``str``) or files (``Path``); return the path of
    ``<out_prefix>.model``.

    Byte fallback means no input ever maps to <unk>; identity normalisation and kept whitespace
    make ``decode(encode(text)) == text``, which preprocessing tests rely on. ids: unk 0, bos 1,
    eos 2, no pad (packed windows need none). Written under a temporary name, then renamed.
    """
    import sentencepiece as spm

    if vocab_size < 260:
        raise DataError(f"--train-tokenizer: expected a vocabulary size >= 260 (256 byte pieces + specials), got {vocab_size}")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = _training_lines(texts_or_files, max_bytes)
    first = next(lines, None)
    if first is None:
        raise DataError("--train-tokenizer: no non-empty text to train the tokenizer on")

    def _all():
        yield first
        yield from lines

    with tempfile.TemporaryDirectory(dir=out_prefix.parent, prefix=".sp-train-") as tmp:
        tmp_prefix = os.path.join(tmp, "sp")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_all(), model_prefix=tmp_prefix, vocab_size=int(vocab_size),
                model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, split_digits=True,
                hard_vocab_limit=False,  # a small corpus may not support the full size
                max_sentence_length=1 << 16, minloglevel=2, num_threads=os.cpu_count() or 1,
            )
        except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 300 vs 310"
            msg = str(e).strip().splitlines()[-1].split("] ")[-1]
            raise DataError(f"--train-tokenizer {vocab_size}: sentencepiece failed: {msg}") from None
        os.replace(tmp_prefix + ".vocab", str(out_prefix) + ".vocab")
        os.replace(tmp_prefix + ".model", str(out_prefix) + ".model")
    return str(out_prefix) + ".model"
