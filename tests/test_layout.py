"""The package's architecture, read from its source: imports only point down the layers, no module imports
itself back through others (counting imports inside functions and type-only ones), and a function-level
import of a twofold module exists only where it defers something heavy or optional, never to dodge a circle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "twofold"

# Low to high: a module may import its own layer's packages' modules and any lower layer's, never a higher one.
LAYERS = [
    {"config", "metrics"},
    {"distributed"},
    {"prefix_tree"},
    {"models", "modelpath", "logprobs"},
    {"sharding", "loss", "envs", "engine"},
    {"rollout"},
    {"oldlogits"},
    {"trainer"},
    {"pipeline"},
    {"study"},
    {"cli"},
]

# (importing module, imported module): why the import waits for the function that needs it.
DEFERRED = {
    ("twofold.cli", "twofold.pipeline.train"): "a config error is reported before torch loads",
    ("twofold.cli", "twofold.study.grid"): "the same: commands import only what they run",
    ("twofold.cli", "twofold.study.report"): "matplotlib and scipy only for `report`, `compare`, `bench`",
    ("twofold.cli", "twofold.study.heldout"): "the same: only `compare --heldout` evaluates",
    ("twofold.cli", "twofold.pipeline.resolve"): "torch and transformers only for commands that load a model",
    ("twofold.cli", "twofold.trainer.warmstart"): "the same",
    ("twofold.cli", "twofold.engine"): "the same",
    ("twofold.cli", "twofold.envs"): "the same",
    ("twofold.cli", "twofold.models"): "the same",
    ("twofold.cli", "twofold.rollout.chat"): "the same",
    ("twofold.cli", "twofold.envs.dataset"): "the same",
    ("twofold.cli", "twofold.modelpath"): "the same",
    ("twofold.cli", "twofold.pipeline.export"): "the same",
    ("twofold.engine", "twofold.engine.vllm"): "vLLM is an optional install",
    ("twofold.engine", "twofold.engine.builtin"): "the CLI reads `twofold.engine.placement` without torch",
    ("twofold.pipeline.train", "twofold.pipeline.ray_runtime"): "Ray is an optional install",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = modules()


def targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The twofold modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = node.module or ""
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return found or ([base] if base in MODULES else [])


def imports() -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import of a twofold module by a twofold module."""
    edges = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        nested = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
            if isinstance(n, (ast.Import, ast.ImportFrom))
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges += [(module, t, id(node) in nested) for t in targets(module, node) if t != module]
    return edges


EDGES = imports()


def layer(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "twofold" and not any(m.split(".")[1] in names for names in LAYERS)] == []


def test_imports_point_down_the_layers():
    upward = [(a, b) for a, b, _ in EDGES if a != "twofold" and layer(b) > layer(a)]
    assert upward == []


def test_no_import_circles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _ in EDGES:
        graph[a].add(b)
    # A package's __init__ importing its own modules is how a package re-exports; a module importing its
    # package's __init__ back is a circle.
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert circles == []


def test_function_level_imports_only_defer():
    lazy = sorted({(a, b) for a, b, inside in EDGES if inside})
    assert [edge for edge in lazy if edge not in DEFERRED] == []


@pytest.mark.parametrize("edge", sorted(DEFERRED))
def test_each_deferred_import_is_still_there(edge):
    assert (*edge, True) in EDGES, f"{edge} is no longer imported inside a function: drop it from DEFERRED"


def test_the_cli_itself_loads_no_heavy_library():
    """What the deferred imports are for, checked in a fresh interpreter: `twofold --help`, `twofold config` and a
    config error answer at once, loading none of the libraries only a run, a study or vLLM needs."""
    code = "import sys, twofold.cli; print(' '.join(m for m in sys.argv[1:] if m in sys.modules))"
    heavy = ["torch", "transformers", "peft", "datasets", "vllm", "ray", "matplotlib", "scipy", "wandb"]
    loaded = subprocess.run([sys.executable, "-c", code, *heavy], capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == []
