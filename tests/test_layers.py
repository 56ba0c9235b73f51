"""The layer rule, checked on the source with ``ast`` (in-function imports included).

    ir (0)  ->  models (1)  ->  runtime (2)  ->  passes (3)  ->  drivers: nnsculpt.* top level (4)

A module imports only its own layer or those below it. The package root ``nnsculpt/__init__``
holds metadata only (``__version__``) and imports nothing of ours, so every layer may read it.
Private names (``_x``) are not imported from another module, and a private module (``_util``)
is imported only from inside its own package. The IR's internals (``Graph._touch`` ...) are
not touched outside ``ir/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> (package name, layer)
FOLDERS = {"ir": ("nnsculpt.ir", 0), "models": ("nnsculpt.models", 1), "runtime": ("nnsculpt.runtime", 2),
           "passes": ("nnsculpt.passes", 3), "pkg": ("nnsculpt", 4)}
IR_INTERNALS = {"_touch", "_uses", "_inputs", "_outputs", "_implicit", "_register_value", "_node_names",
                "_name_counter", "_node_name_set"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, (pkg, _) in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int | None:
    """Layer of a module name of ours (None: not ours; -1: the metadata-only package root)."""
    if module == "nnsculpt":
        return -1
    if not module.startswith("nnsculpt."):
        return None
    sub = module.split(".")[1]
    for pkg, layer in FOLDERS.values():
        if pkg != "nnsculpt" and pkg.split(".")[1] == sub:
            return layer
    return FOLDERS["pkg"][1]  # nnsculpt.cli, nnsculpt.prune, ...


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(module, path).split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import statement, nested ones included."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            target = _resolve(module, path, node)
            names = [a.name for a in node.names]
            # ``from . import x`` imports module x when x is a submodule of ours
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            out.append((node.lineno, target, [n for n in names if n not in subs]))
            out.extend((node.lineno, f"{target}.{n}", []) for n in subs)
    return out


def test_every_folder_has_modules():
    for folder in FOLDERS:
        assert any(p.parent.relative_to(ROOT).parts[0] == folder for p in MODULES.values()), folder


def test_no_upward_imports():
    bad = []
    for module, path in MODULES.items():
        mine = layer_of(module)
        for line, target, _ in imports(module, path):
            theirs = layer_of(target)
            if theirs is None:
                continue
            if mine == -1:
                bad.append(f"{path.relative_to(ROOT)}:{line}: the package root imports {target}")
            elif theirs > mine:
                bad.append(f"{path.relative_to(ROOT)}:{line}: layer {mine} module {module} imports "
                           f"layer {theirs} module {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for module, path in MODULES.items():
        for line, target, names in imports(module, path):
            if layer_of(target) is None:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: imports private name {n} from {target}")
            parts = target.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if not (module == owner or module.startswith(owner + ".")):
                        bad.append(f"{path.relative_to(ROOT)}:{line}: imports private module {target} "
                                   f"from outside {owner}")
    assert not bad, "\n".join(bad)


def test_ir_internals_stay_in_ir():
    bad = []
    for module, path in MODULES.items():
        if module.startswith("nnsculpt.ir"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in IR_INTERNALS:
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: touches IR internal .{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, expect", [
    ("from ..passes.base import Pass", "upward"),
    ("from ..ir.graph import _private", "private"),
    ("from ..passes import _util", "private"),
])
def test_the_checks_catch_violations(tmp_path, source, expect):
    """The walkers above flag a planted violation in a runtime module (they can fail)."""
    path = tmp_path / "planted.py"
    path.write_text(f"def f():\n    {source}\n")
    module = "nnsculpt.runtime.planted"
    found = imports(module, path)
    assert found
    if expect == "upward":
        assert any(layer_of(t) > layer_of(module) for _, t, _ in found)
    else:
        assert any(any(n.startswith("_") for n in names) or any(p.startswith("_") for p in t.split("."))
                   for _, t, names in found)


def test_grep_acceptance():
    """No ``from ..runtime`` inside ir/ and no ``from ..passes`` inside runtime/ (the issue's check)."""
    for folder, needle in (("ir", "from ..runtime"), ("runtime", "from ..passes")):
        hits = [f"{p}:{i}" for p in (ROOT / folder).rglob("*.py")
                for i, ln in enumerate(p.read_text().splitlines(), 1) if needle in ln]
        assert not hits, hits


def test_every_package_is_in_pyproject():
    """pyproject lists packages explicitly (the folders are mapped): a subpackage missing there
    would be left out of a wheel built by ``pip install .`` (the README's quick start)."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert packages == listed, (sorted(packages - listed), sorted(listed - packages))
