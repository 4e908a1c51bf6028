"""The package's house rules that a reader relies on: layers import only downwards, and every
subpackage declares its public names."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rh_lens"
# Lowest first; a module may import from its own layer or any layer before it.
LAYERS = [
    {"errors", "heads", "uncertainty"},
    {"model"},
    {"tasks"},
    {"execution"},
    {"detection"},
    {"interventions", "analysis", "kv"},
    {"app"},
]
SUBPACKAGES = ["model", "tasks", "detection", "execution", "interventions", "analysis", "kv", "app"]


def layer_of(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def rh_lens_imports(path: Path) -> list[str]:
    """The first component below `rh_lens.` of every rh_lens module this file imports."""
    parts = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rh_lens."):
            parts.append(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            parts += [a.name.split(".")[1] for a in node.names if a.name.startswith("rh_lens.")]
    return parts


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_import_only_their_own_layer_or_lower(path):
    relative = path.relative_to(PACKAGE)
    if relative == Path("__init__.py"):
        return  # the public API re-exports every layer
    own = layer_of(relative.parts[0].removesuffix(".py"))
    upward = [part for part in rh_lens_imports(path) if layer_of(part) > own]
    assert not upward, f"{relative} imports from a higher layer: {upward}"


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_subpackage_declares_names_that_exist(name):
    module = importlib.import_module(f"rh_lens.{name}")
    assert module.__all__, f"rh_lens.{name} has an empty __all__"
    assert len(set(module.__all__)) == len(module.__all__)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing


def test_the_top_level_api_exists_and_leaves_out_the_front_ends():
    import rh_lens

    assert not [n for n in rh_lens.__all__ if not hasattr(rh_lens, n)]
    for name in (
        "load_model",
        "Grid",
        "detect",
        "mask_heads",
        "activation_patching",
        "KVPolicy",
        "bootstrap",
        "RunOptions",
        "RhLensError",
    ):
        assert name in rh_lens.__all__
    # `import rh_lens` loads neither the front ends nor pyplot (a fresh interpreter tells)
    check = "import sys, rh_lens; print('rh_lens.app' in sys.modules, 'matplotlib.pyplot' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.split() == [
        "False",
        "False",
    ]


def module_graph(subpackage: str) -> dict[str, set[str]]:
    """Module -> the modules of the same subpackage it imports, at the top or inside a function."""
    graph = {}
    for path in sorted((PACKAGE / subpackage).glob("*.py")):
        if path.stem == "__init__":
            continue
        prefix = f"rh_lens.{subpackage}."
        modules = [n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.module]
        graph[path.stem] = {m.removeprefix(prefix) for m in modules if m.startswith(prefix)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found = []

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                found.append([*path, nxt])
            elif nxt not in path:
                walk(nxt, [*path, nxt])

    for start in graph:
        walk(start, [start])
    return found


def test_cycles_finds_an_import_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c", "a"],
        ["b", "c", "a", "b"],
        ["c", "a", "b", "c"],
    ]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_no_import_circle_inside_a_subpackage(name):
    """Data loading has one home (tasks.data) that task modules import; no module imports one
    that imports it back, not even inside a function."""
    assert cycles(module_graph(name)) == []
