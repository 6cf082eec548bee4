"""Passkey retrieval probe: documents with a key hidden in real text, and their scoring.

A passkey document is real-text filler with a needle sentence at some depth and the question
with its answer at the end::

    <filler> The pass key is red gold. Remember it. <filler> What is the pass key? The pass key is red gold.

The key is ``key_len`` words from a small alphabet (:data:`KEY_WORDS`), each a single token under a
tokenizer trained on filler + these templates (checked by :func:`check_tokenizer`). Documents are
built to an exact token count and an exact *distance* (tokens from the needle's first key token to
the answer's first key token), so a training corpus can be packed window-aligned and an eval set
probes chosen distances.

Scoring (:func:`score_model`): teacher-forced argmax at every answer key position; a sample is
correct when all key tokens are predicted (exact match). Chance is ``1 / len(KEY_WORDS)**key_len``
for a model that knows the template but not the key. The held-out LM loss is the mean next-token
cross-entropy over unpacked held-out plain-text sequences.

This is the small probe the demo needs; the NIAH/RULER suites are separate.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

KEY_WORDS = ("red", "blue", "green", "black", "white", "gold", "pink", "gray", "brown", "silver",
             "orange", "purple", "yellow", "violet", "cyan", "navy")
NEEDLE = "The pass key is {key}. Remember it."
QUESTION = "What is the pass key? The pass key is"


def normalize_text(text: str) -> str:
    """Single spaces only: sentencepiece then tokenizes each space-separated unit on its own, so a
    document's token count is the sum of its units' counts."""
    return " ".join(text.split())


def template_texts(n: int, seed: int = 0, key_len: int = 1) -> List[str]:
    """Needle + question sentences with random keys, for tokenizer training."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        key = " ".join(rng.choice(KEY_WORDS) for _ in range(key_len))
        out.append(f"{NEEDLE.format(key=key)} {QUESTION} {key}.")
    return out


def check_tokenizer(tokenizer) -> None:
    """Every key word must be exactly one token (as a space-separated unit)."""
    multi = {w: tokenizer.encode(w) for w in KEY_WORDS if len(tokenizer.encode(w)) != 1}
    if multi:
        raise ValueError(f"tokenizer {tokenizer.path}: key words are not single tokens: {multi}")


@dataclass
class PasskeyDoc:
    text: str
    ids: List[int]  # token ids, no EOS
    key: str
    needle_pos: int  # index of the needle's first key token
    answer_pos: int  # index of the answer's first key token
    key_len: int  # number of key tokens

    @property
    def distance(self) -> int:
        return self.answer_pos - self.needle_pos


@dataclass
class _Units:
    words: List[str] = field(default_factory=list)
    ids: List[List[int]] = field(default_factory=list)

    def add(self, word: str, ids: List[int]):
        self.words.append(word)
        self.ids.append(ids)

    @property
    def n_tokens(self) -> int:
        return sum(len(i) for i in self.ids)


class PasskeyGenerator:
    """Builds passkey documents and plain-text chunks of exact token lengths from filler texts."""

    def __init__(self, tokenizer, filler_texts: Sequence[str], seed: int = 0, key_len: int = 1):
        check_tokenizer(tokenizer)
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.key_len = key_len
        self._cache: Dict[str, List[int]] = {}
        self.fillers = [normalize_text(t).split(" ") for t in filler_texts if t.strip()]
        if not self.fillers:
            raise ValueError("PasskeyGenerator: no filler text")
        self._para = self.rng.randrange(len(self.fillers))
        self._word = 0
        self._one_token = [w for w in ("the", "of", "and", "in", "a", "to", "is", "was")
                           if len(self._encode(w)) == 1]
        if not self._one_token:
            raise ValueError(f"tokenizer {tokenizer.path}: no single-token filler word")

    def _encode(self, unit: str) -> List[int]:
        ids = self._cache.get(unit)
        if ids is None:
            ids = self._cache[unit] = self.tok.encode(unit)
        return ids

    def _next_word(self) -> str:
        words = self.fillers[self._para]
        if self._word >= len(words):
            self._para = self.rng.randrange(len(self.fillers))
            self._word = 0
            words = self.fillers[self._para]
        self._word += 1
        return words[self._word - 1]

    def _filler(self, n_tokens: int) -> _Units:
        """Consecutive filler words adding up to exactly ``n_tokens`` tokens."""
        out = _Units()
        skipped = 0
        while out.n_tokens < n_tokens:
            left = n_tokens - out.n_tokens
            word = self._next_word() if skipped < 8 else self.rng.choice(self._one_token)
            ids = self._encode(word)
            if len(ids) <= left:
                out.add(word, ids)
                skipped = 0
            else:
                skipped += 1
        return out

    def _template(self, text: str) -> _Units:
        out = _Units()
        for w in text.split(" "):
            out.add(w, self._encode(w))
        return out

    def random_key(self) -> str:
        return " ".join(self.rng.choice(KEY_WORDS) for _ in range(self.key_len))

    def overhead(self) -> int:
        """Tokens of a passkey document that are not filler (needle + question + answer)."""
        key = " ".join(KEY_WORDS[:self.key_len])
        return (self._template(NEEDLE.format(key=key)).n_tokens + self._template(QUESTION).n_tokens
                + self._template(key + ".").n_tokens)

    def qa_tokens(self) -> int:
        """Tokens of one question + answer."""
        key = " ".join(KEY_WORDS[:self.key_len])
        return self._template(QUESTION).n_tokens + self._template(key + ".").n_tokens

    def passkey_doc(self, n_tokens: int, distance: Optional[int] = None, key: Optional[str] = None,
                    questions: int = 1) -> PasskeyDoc:
        """A passkey document of exactly ``n_tokens`` tokens (no EOS). ``distance`` (needle key to
        first answer key) None = the needle at a uniformly random depth. ``questions`` > 1 asks the
        question again (with its answer) at random points after the first one, the last at the end:
        more retrieval targets per training document. Scoring uses the first answer."""
        key = key or self.random_key()
        needle = self._template(NEEDLE.format(key=key))
        question = self._template(QUESTION)
        answer = self._template(key + ".")
        key_ids = [self._encode(w)[0] for w in key.split(" ")]
        needle_head = self._template("The pass key is").n_tokens  # precedes the key
        qa = question.n_tokens + answer.n_tokens
        fixed = needle.n_tokens + questions * qa
        if n_tokens < fixed:
            raise ValueError(f"passkey document of {n_tokens} tokens with {questions} question(s): "
                             f"needs at least {fixed}")
        # distance = (needle tokens from the key on) + middle filler + question tokens
        min_d = needle.n_tokens - needle_head + question.n_tokens
        max_d = n_tokens - needle_head - answer.n_tokens - (questions - 1) * qa
        if distance is None:
            distance = self.rng.randint(min_d, max_d)
        if not min_d <= distance <= max_d:
            raise ValueError(f"distance {distance}: expected {min_d}..{max_d} in a {n_tokens}-token document")
        middle = distance - min_d
        spare = n_tokens - fixed - middle  # filler before the needle and between later questions
        cuts = sorted(self.rng.randint(0, spare) for _ in range(questions - 1))
        gaps = [b - a for a, b in zip([0] + cuts, cuts + [spare])]  # before needle, then after each Q/A
        parts = [self._filler(gaps[0]), needle, self._filler(middle), question, answer]
        for g in gaps[1:]:
            parts += [self._filler(g), question, answer]
        words = [w for p in parts for w in p.words]
        ids = [i for p in parts for x in p.ids for i in x]
        needle_pos = parts[0].n_tokens + needle_head
        answer_pos = needle_pos + distance
        text = " ".join(words)
        assert len(ids) == n_tokens and ids[needle_pos:needle_pos + self.key_len] == key_ids
        assert ids[answer_pos:answer_pos + self.key_len] == key_ids
        return PasskeyDoc(text, ids, key, needle_pos, answer_pos, self.key_len)

    def question_ids(self) -> List[int]:
        """Token ids of the question prompt (the answer's key follows them)."""
        return [i for x in self._template(QUESTION).ids for i in x]

    def plain_doc(self, n_tokens: int) -> str:
        """Real text of exactly ``n_tokens`` tokens."""
        return " ".join(self._filler(n_tokens).words)


def verify_exact(tokenizer, doc: PasskeyDoc) -> bool:
    """The document's text tokenizes to exactly its ids (units tokenize independently)."""
    return tokenizer.encode(doc.text) == doc.ids


# ------------------------------------------------------------------------------------- scoring
def build_eval_set(gen: PasskeyGenerator, seq_length: int, distances: Iterable[int],
                   samples_per_distance: int) -> Dict[int, List[PasskeyDoc]]:
    return {d: [gen.passkey_doc(seq_length, distance=d) for _ in range(samples_per_distance)]
            for d in distances}


def load_model(run_dir, seq_length: int):
    """(model, RunConfig) of a training run's latest checkpoint, built single-rank in this process
    (call :func:`megatron_kd.distributed.init_distributed` first)."""
    from megatron_kd import distributed
    from megatron_kd.config import ParallelConfig, load_config
    from megatron_kd.data import load_tokenizer
    from megatron_kd.models import build_model
    from megatron_kd.training import checkpointing

    run_dir = Path(run_dir)
    cfg = load_config(str(run_dir / "config.yaml"))
    vocab = load_tokenizer(cfg.data.tokenizer_model).vocab_size
    distributed.init_model_parallel(ParallelConfig(), cfg.train.seed)
    model = build_model(cfg.model, ParallelConfig(), vocab, seq_length)
    checkpointing.load_model_weights(run_dir / "checkpoints", [model])
    model.eval()
    return model, cfg


def _logits(model, ids_batch, vocab_size: int):
    """Unpacked sequences (one document each, positions 0..s-1) -> fp32 logits [b, s, V]."""
    import torch

    from megatron_kd import platform
    from megatron_kd.models.attention import attention_mask

    tokens = torch.tensor(ids_batch, dtype=torch.long, device=platform.device())
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s).contiguous()
    docs = torch.zeros_like(tokens)
    logits = model(tokens, positions, attention_mask(docs))
    return logits[..., :vocab_size].float()


def score_samples(model, vocab_size: int, docs: Sequence[PasskeyDoc], batch_size: int = 16) -> List[int]:
    """Per document 1/0: every answer key token is the teacher-forced argmax (exact match)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(docs), batch_size):
            chunk = docs[i:i + batch_size]
            logits = _logits(model, [doc.ids for doc in chunk], vocab_size)
            for row, doc in zip(logits, chunk):
                # the token at p is predicted from position p - 1 (teacher forcing)
                pos = torch.arange(doc.answer_pos - 1, doc.answer_pos - 1 + doc.key_len)
                pred = row[pos].argmax(-1).tolist()
                out.append(int(pred == doc.ids[doc.answer_pos:doc.answer_pos + doc.key_len]))
    return out


def heldout_loss(model, vocab_size: int, heldout_ids: Sequence[Sequence[int]], batch_size: int = 16) -> float:
    """Mean next-token CE over unpacked held-out sequences (positions 0..s-1)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(heldout_ids), batch_size):
            chunk = [list(x) for x in heldout_ids[i:i + batch_size]]
            logits = _logits(model, chunk, vocab_size)
            tokens = torch.tensor(chunk, dtype=torch.long, device=logits.device)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                   reduction="sum")
            total += loss.item()
            count += tokens[:, 1:].numel()
    return total / max(count, 1)


def score_model(model, vocab_size: int, eval_set: Dict[int, List[PasskeyDoc]],
                heldout_ids: Sequence[Sequence[int]], batch_size: int = 16) -> dict:
    """{"accuracy": {distance: exact-match fraction}, "heldout_loss": mean CE per token}."""
    acc = {}
    for d, docs in eval_set.items():
        hits = score_samples(model, vocab_size, docs, batch_size)
        acc[int(d)] = sum(hits) / len(docs)
    return {"accuracy": acc, "heldout_loss": heldout_loss(model, vocab_size, heldout_ids, batch_size)}


# ------------------------------------------------------------------------ teacher objective
def answer_mask(tokens, question_ids: Sequence[int], key_len: int):
    """``[b, s]`` float32: 1 at the positions whose *label* is an answer key token, i.e. the last
    question token and the ``key_len - 1`` positions after it, for every complete occurrence of
    ``question_ids`` in ``tokens`` (the needle's "The pass key is" is not preceded by the
    question, so it is never marked)."""
    import torch

    b, s = tokens.shape
    q = len(question_ids)
    mask = torch.zeros(b, s, dtype=torch.float32, device=tokens.device)
    if s < q:
        return mask
    qt = torch.tensor(list(question_ids), dtype=tokens.dtype, device=tokens.device)
    ends = (tokens.unfold(1, q, 1) == qt).all(-1)  # [b, s - q + 1]: question starting at i
    for k in range(key_len):
        lo = q - 1 + k
        if lo < s:
            mask[:, lo:] = torch.maximum(mask[:, lo:], ends[:, :s - lo].float())
    return mask


class AnswerObjective:
    """The demo teacher's objective: next-token CE on the passkey *answer* tokens (the key after
    each "What is the pass key? The pass key is"), found in the batch by matching the question's
    token ids; optionally plus ``lm_weight`` x the mean CE over every other token.

    Plain next-token CE over whole passkey documents spends a few % of the loss on the key, and
    a tiny model stays at chance on retrieval within a CPU budget (DESIGN.md §5); the loss on the
    key alone, with a length curriculum, breaks the plateau. It plugs into
    ``megatron_kd.run.train(cfg, objective_factory=...)`` (same forward-step contract as
    :class:`~megatron_kd.training.objective.CrossEntropyObjective`); the reduction is the sum over
    answer tokens / their global count, as for every objective. Reports ``answer loss`` (the
    objective), ``answer acc`` (fraction of answer tokens with p(key) > 1/2, a lower bound on
    argmax accuracy) and ``lm loss`` (CE over all tokens, for monitoring).
    """

    name = "answer loss"

    def __init__(self, device, question_ids: Sequence[int], key_len: int, lm_weight: float = 0.0):
        self.device = device
        self.question_ids = list(question_ids)
        self.key_len = key_len
        self.lm_weight = float(lm_weight)

    @classmethod
    def factory(cls, question_ids: Sequence[int], key_len: int, lm_weight: float = 0.0):
        """An ``objective_factory(cfg, device)`` for :func:`megatron_kd.run.train`."""
        return lambda cfg, device: cls(device, question_ids, key_len, lm_weight)

    def forward_step(self, data_iterator, model):
        from functools import partial

        from megatron_kd.models.attention import attention_mask
        from megatron_kd.training.objective import batch_to_device

        batch = batch_to_device(next(data_iterator), self.device)
        output = model(batch["tokens"], batch["position_ids"], attention_mask(batch["document_ids"]),
                       labels=batch["labels"])
        answers = answer_mask(batch["tokens"], self.question_ids, self.key_len) * batch["loss_mask"]
        return output, partial(self.loss_func, answers, batch["loss_mask"])

    def loss_func(self, answers, loss_mask, output):
        import math

        import torch

        from megatron_kd.training.objective import masked_sum_and_count

        key_sum, key_count = masked_sum_and_count(output, answers)
        lm_sum, lm_count = masked_sum_and_count(output, loss_mask)
        loss = key_sum
        if self.lm_weight:
            # lm_weight x (mean CE over all tokens), expressed per answer token
            loss = loss + self.lm_weight * lm_sum * (key_count.float() / lm_count.clamp(min=1).float())
        hits = ((output.float() < math.log(2)).float() * answers).sum()
        report = {self.name: torch.stack([key_sum.detach(), key_count.float()]),
                  "answer acc": torch.stack([hits.detach(), key_count.float()]),
                  "lm loss": torch.stack([lm_sum.detach(), lm_count.float()])}
        return loss, key_count, report
