"""The package's layers, lowest first, read from the imports themselves (function-local ones
too): a module imports only from its own layer or lower, and no two modules import each other
through any chain. README.md's "Map of the code" draws the same table."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("megatron_transfusion", "kernels", "checkpoints", "data_prep", "launch")

# Module-name prefixes per layer; the longest matching prefix decides a module's layer.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (
        "megatron_transfusion",
        "megatron_transfusion.config",
        "megatron_transfusion.batch",
        "megatron_transfusion.platform",
        "megatron_transfusion.compat",
    ),
    "kernels": ("kernels",),
    "model": (
        "megatron_transfusion.model",
        "megatron_transfusion.diffusion",
        "megatron_transfusion.loss",
        "data_prep",
        "data_prep.images",
        "data_prep.readers",
        "data_prep.tokenizer",
        "data_prep.vae",
    ),
    "runtime": (
        "megatron_transfusion.parallel",
        "megatron_transfusion.data",
        "megatron_transfusion.training",
        "checkpoints",
    ),
    "programs": (
        "megatron_transfusion.training.trainer",
        "megatron_transfusion.inference",
        "megatron_transfusion.evaluation",
        "megatron_transfusion.planning",
        "megatron_transfusion.smoke",
        "megatron_transfusion.synthetic",
        "data_prep.shard",
        "data_prep.shapes",
        "data_prep.builtin",
        "data_prep.prepare_builtin",
    ),
    "cli": (
        "megatron_transfusion.cli",
        "megatron_transfusion.train",
        "megatron_transfusion.launch",
        "megatron_transfusion.console",
        "megatron_transfusion.inference.cli",
        "megatron_transfusion.evaluation.cli",
        "megatron_transfusion.planning.cli",
        "checkpoints.cli",
    ),
}
RANK = {name: rank for rank, name in enumerate(LAYERS)}


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # ``from package import module`` imports the module; ``from module import name``
            # the module.
            candidates = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for candidate in candidates:
            while (
                candidate and candidate not in known
            ):  # ``import a.b.c`` where only ``a.b`` is ours
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def layer_of(name: str) -> str | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best[1])
            ):
                best = (layer, prefix)
    return best[0] if best else None


def graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
        for a, targets in edges.items()
        for b in targets
        if RANK[layer_of(b)] > RANK[layer_of(a)]
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    assert [name for name in modules(ROOT) if layer_of(name) is None] == []


def test_no_module_imports_a_higher_layer():
    assert upward_imports(graph(ROOT)) == []


def test_no_import_cycles():
    assert cycles(graph(ROOT)) == []


def test_nothing_imports_a_cli_module():
    edges = graph(ROOT)
    offenders = sorted(
        f"{a} imports {b}"
        for a, targets in edges.items()
        for b in targets
        if layer_of(b) == "cli" and layer_of(a) != "cli"
    )
    assert offenders == []


@pytest.fixture
def tree(tmp_path):
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return tmp_path


def test_a_planted_upward_import_is_caught(tree):
    with (tree / "kernels" / "attention.py").open("a") as f:
        f.write(
            "\n\ndef _planted():\n"
            "    from megatron_transfusion.training import trainer  # noqa: F401\n"
        )
    planted = "kernels.attention (kernels) imports megatron_transfusion.training.trainer (programs)"
    assert planted in upward_imports(graph(tree))


def test_a_planted_cycle_is_caught(tree):
    # Both modules are in the model layer: a cycle is caught even where no layer is crossed.
    with (tree / "megatron_transfusion" / "diffusion" / "schedule.py").open("a") as f:
        f.write(
            "\n\ndef _planted():\n"
            "    from megatron_transfusion.diffusion import sampler  # noqa: F401\n"
        )
    assert cycles(graph(tree)) == [
        ["megatron_transfusion.diffusion.sampler", "megatron_transfusion.diffusion.schedule"]
    ]
