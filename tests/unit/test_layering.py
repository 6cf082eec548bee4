"""Layering, checked on the source (AST; no import is executed, ~0.3 s).

* ``training/`` takes its objective, model chunks and trainer class from a registry
  (training/registry.py) that the higher layers fill (megatron_kd/train_specs.py), so nothing it
  imports, directly or through another module of ours, at module level or inside a function,
  absolute or relative, comes from a higher layer.
* ``models/`` and ``data/`` import nothing of the training stack or above.
* The backend choice (``platform.layer_spec_kind()``) is consulted by exactly the modules
  README.md and docs/design.md §1 list: a new ``if te`` elsewhere fails here until it is argued
  for in the docs.
"""
from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megatron_kd"

# everything above training/: objectives and trainers registered into it, and the programs using it
ABOVE_TRAINING = ("megatron_kd.kd", "megatron_kd.longred", "megatron_kd.eval", "megatron_kd.analysis",
                  "megatron_kd.study", "megatron_kd.demo", "megatron_kd.cli",
                  "megatron_kd.train_specs", "megatron_kd.run")
ABOVE_MODELS_DATA = ("megatron_kd.training",) + ABOVE_TRAINING

# the modules that ask which backend is active, and why (README "Dive into the code", design.md §1)
BACKEND_CONSULTERS = {
    "megatron_kd/models/attention.py",  # the layer spec, final norm and core attention: THE choice
    "megatron_kd/models/builder.py",  # refusals: FP8 needs TE; chunked attention with CP on TE
    "megatron_kd/data/cp_layout.py",  # TE takes THD cu_seqlens in the batch
    "megatron_kd/eval/generate.py",  # TE's THD path cannot left-pad: equal-length decode batches
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str):
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path):
    """(module name, line) for every import in ``path``, at any nesting level: ``import a.b``,
    ``from a.b import c`` (both ``a.b`` and ``a.b.c``, which may be a submodule), relative imports
    resolved against the file's package, and ``importlib.import_module("...")`` with a literal."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            yield mod, node.lineno
            for alias in node.names:
                yield f"{mod}.{alias.name}", node.lineno
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.args[0].value, node.lineno


def is_under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def own_modules_loaded(name: str) -> list:
    """``name`` and its parent packages (importing a.b.c runs a/__init__ and a/b/__init__ too)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def upward_imports(package: str, forbidden) -> list:
    """Every chain ``module -> ... -> forbidden module`` reachable from a module of ``package``
    through our own modules' imports (one line per offending edge, with the chain that reaches it)."""
    roots = sorted(module_name(p) for p in REPO.joinpath(*package.split(".")).rglob("*.py"))
    via = {r: None for r in roots}  # module -> (importer, line) that first reached it
    queue, found = deque(roots), []
    while queue:
        mod = queue.popleft()
        path = module_file(mod)
        if path is None:
            continue
        reported = set()  # lines: `from a.b import c` yields a.b and a.b.c
        for imported, line in imported_names(path):
            if is_under(imported, forbidden):
                if line in reported:
                    continue
                reported.add(line)
                chain, m = [], mod
                while m is not None:
                    chain.append(m)
                    m = via[m][0] if via[m] else None
                where = f"{path.relative_to(REPO)}:{line}"
                found.append(f"{' -> '.join(reversed(chain))} -> {imported} ({where})")
                continue
            for loaded in own_modules_loaded(imported):
                if loaded.split(".")[0] == "megatron_kd" and loaded not in via and module_file(loaded):
                    via[loaded] = (mod, line)
                    queue.append(loaded)
    return sorted(set(found))


def test_training_imports_nothing_above_it():
    found = upward_imports("megatron_kd.training", ABOVE_TRAINING)
    assert not found, ("training/ must take objectives, model chunks and trainers from "
                       "training/registry.py, not import them:\n" + "\n".join(found))


@pytest.mark.parametrize("package", ["megatron_kd.models", "megatron_kd.data"])
def test_models_and_data_import_nothing_above_them(package):
    found = upward_imports(package, ABOVE_MODELS_DATA)
    assert not found, f"{package} imports from the training stack or above:\n" + "\n".join(found)


def test_scan_sees_every_import_form(tmp_path, monkeypatch):
    """The scanner itself: absolute, from-package, relative and nested imports are all caught."""
    pkg = tmp_path / "megatron_kd" / "training"
    pkg.mkdir(parents=True)
    (tmp_path / "megatron_kd" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    import megatron_kd.kd.losses\n")
    (pkg / "b.py").write_text("from megatron_kd import longred\n")
    (pkg / "c.py").write_text("class C:\n    def m(self):\n        from ..eval import generate\n")
    (pkg / "d.py").write_text("from .. import cli\n")
    (pkg / "e.py").write_text("from megatron_kd import lower\n")  # reaches a higher layer through lower
    (tmp_path / "megatron_kd" / "lower.py").write_text(
        "import importlib\nimportlib.import_module('megatron_kd.analysis.runs')\n")
    (pkg / "ok.py").write_text("from megatron_kd import platform, distributed\nfrom . import a_ok\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = upward_imports("megatron_kd.training", ABOVE_TRAINING)
    firsts = {line.split(" -> ")[0] for line in found}
    assert firsts == {f"megatron_kd.training.{m}" for m in "abcde"}, found
    assert any(line.startswith("megatron_kd.training.e -> megatron_kd.lower -> megatron_kd.analysis")
               for line in found), found


def backend_consulters() -> set:
    out = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Call)
                    and getattr(node.func, "attr", getattr(node.func, "id", None)) == "layer_spec_kind"):
                out.add(str(path.relative_to(REPO)))
    return out


def test_backend_choice_is_consulted_only_where_documented():
    found = backend_consulters()
    assert found == BACKEND_CONSULTERS, (
        f"platform.layer_spec_kind() is called in {sorted(found - BACKEND_CONSULTERS)} (not documented) / "
        f"no longer in {sorted(BACKEND_CONSULTERS - found)}: pass the choice down from models/attention.py, "
        "or list the module and its reason in README.md's platform.py row and docs/design.md §1")
    readme = (REPO / "README.md").read_text()
    platform_row = next(line for line in readme.splitlines() if line.startswith("| `megatron_kd/platform.py`"))
    design = (REPO / "docs" / "design.md").read_text()
    for path in BACKEND_CONSULTERS:
        short = path.removeprefix("megatron_kd/")
        assert short in platform_row, f"README.md's platform.py row does not name {short}"
        assert f"`{short}`" in design.split("## 2.")[0], f"docs/design.md §1 does not name {short}"
