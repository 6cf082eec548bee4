"""Load NVIDIA's RULER generator scripts from the installed ``nvidia-long-context-eval`` wheel.

They parse ``sys.argv`` at import time and import ``tokenizer`` (needs tenacity), ``wonderwords``
and nltk's punkt (not installed here, punkt needs a download). This loader gives each import its
argv, a ``tokenizer`` module whose ``select_tokenizer`` returns the tokenizer under test, and -
only where the script imports them - stand-ins for wonderwords (a given word list) and nltk's
``sent_tokenize`` (our regex splitter). The generation logic itself is NVIDIA's, unmodified.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

from megatron_kd.eval.haystack import _SENTENCE_END
from megatron_kd.eval.ruler.config import package_dir

STUB_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


class _Tok:
    def __init__(self, tok):
        self.tok = tok

    def text_to_tokens(self, text):
        return self.tok.encode(text)


def load(script: str, tok, argv: list, words=STUB_WORDS):
    synth = package_dir() / "data" / "synthetic"
    stubs = {"tokenizer": types.SimpleNamespace(select_tokenizer=lambda *a, **k: _Tok(tok))}
    ww = types.ModuleType("wonderwords")
    ww.random_word = types.SimpleNamespace(_get_words_from_text_file=lambda name: list(words))
    stubs["wonderwords"] = ww
    nltk, nltk_tok = types.ModuleType("nltk"), types.ModuleType("nltk.tokenize")
    nltk_tok.sent_tokenize = lambda text: [s for s in _SENTENCE_END.split(text) if s]
    nltk.tokenize = nltk_tok
    stubs.update({"nltk": nltk, "nltk.tokenize": nltk_tok,
                  "long_context_eval.data.tokenizer": stubs["tokenizer"]})
    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_mods = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    sys.argv = [script, "--save_dir", "/nonexistent", "--save_name", "x", "--tokenizer_path", "x",
                "--num_samples", "1", *argv]
    sys.path.insert(0, str(synth))  # `from constants import TASKS` in variable_tracking.py
    try:
        spec = importlib.util.spec_from_file_location(f"nvidia_ruler_{Path(script).stem}_{id(argv)}",
                                                      synth / script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for k, v in saved_mods.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
