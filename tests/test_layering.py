"""The house rules, checked on the source: which floor may import which, no import circle, short files.

Floors, bottom up (README "Layout" states them in words):
0. utilities: errors, safe_write, image_io, image_ops, tokenizer, sharding, distributed: import nothing of ours
   above them;
1. models: the Flax modules; 2. schedulers and convert stand on models; prompts on convert;
3. runs (a training run on disk) stands on convert; 4. sampling stands on runs, never on train; train stands on
everything below and on data_pipeline; 5. the products (demo, app, evaluate) on sampling. data_pipeline knows
only the utilities.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
UTILITIES = {"pasd_jax.errors", "pasd_jax.safe_write", "pasd_jax.image_io", "pasd_jax.image_ops", "pasd_jax.tokenizer",
             "pasd_jax.sharding", "pasd_jax.assets", "pasd_jax.distributed"}
ALLOWED = {  # package -> the packages of ours it may import (besides itself and the utilities)
    "pasd_jax.errors": set(), "pasd_jax.safe_write": set(), "pasd_jax.image_io": set(),
    "pasd_jax.image_ops": set(), "pasd_jax.tokenizer": set(), "pasd_jax.sharding": set(),
    "pasd_jax.distributed": set(),
    "pasd_jax.models": set(),
    "pasd_jax.schedulers": {"pasd_jax.models"},
    "pasd_jax.convert": {"pasd_jax.models"},
    # the `pasd-convert` CLI: above runs, since `export` reads a training run
    "pasd_jax.convert_cli": {"pasd_jax.models", "pasd_jax.convert", "pasd_jax.runs"},
    "pasd_jax.prompts": {"pasd_jax.models", "pasd_jax.convert"},
    "pasd_jax.runs": {"pasd_jax.models", "pasd_jax.convert", "pasd_jax.schedulers"},
    "pasd_jax.sampling": {"pasd_jax.models", "pasd_jax.convert", "pasd_jax.schedulers", "pasd_jax.prompts",
                          "pasd_jax.runs"},
    "pasd_jax.train": {"pasd_jax.models", "pasd_jax.convert", "pasd_jax.schedulers", "pasd_jax.prompts",
                       "pasd_jax.runs", "pasd_jax.sampling", "data_pipeline", "configs"},
    "pasd_jax.evaluate": {"pasd_jax.models", "pasd_jax.convert", "pasd_jax.schedulers", "pasd_jax.prompts",
                          "pasd_jax.runs", "pasd_jax.sampling"},
    "pasd_jax.app": {"pasd_jax.models", "pasd_jax.convert", "pasd_jax.schedulers", "pasd_jax.prompts",
                     "pasd_jax.runs", "pasd_jax.sampling", "pasd_jax.evaluate"},
    "pasd_jax.demo": {"pasd_jax.models", "pasd_jax.convert", "pasd_jax.schedulers", "pasd_jax.prompts",
                      "pasd_jax.runs", "pasd_jax.sampling", "pasd_jax.train", "pasd_jax.evaluate", "data_pipeline",
                      "configs"},
    "data_pipeline": set(),
    "configs": {"pasd_jax.prompts", "data_pipeline"},
}
# Files allowed past MAX_LINES, with the reason.
LONG_FILES = {
}
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for root in ("pasd_jax", "data_pipeline", "configs"):
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: pathlib.Path, name: str, top_level_only: bool = False) -> set[str]:
    """Modules of ours imported by a file (lazy imports inside functions too, unless `top_level_only`)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module-level imports, including those under a module-level `if` (e.g. TYPE_CHECKING)
        nodes = [m for n in nodes for m in ([n] if not isinstance(n, ast.If) else ast.walk(n))
                 if isinstance(m, (ast.Import, ast.ImportFrom))]
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("pasd_jax", "data_pipeline", "configs")}


def _package(module: str) -> str:
    """The floor a module belongs to: the longest key of ALLOWED that prefixes it."""
    best = ""
    for key in ALLOWED:
        if (module == key or module.startswith(key + ".")) and len(key) > len(best):
            best = key
    return best or module


def test_every_module_has_a_floor():
    unknown = sorted(m for m in _modules() if _package(m) not in ALLOWED and m != "pasd_jax")
    assert not unknown, f"modules outside every floor (add them to ALLOWED with their rule): {unknown}"


def test_no_import_from_a_higher_floor():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        floor = _package(name)
        if floor not in ALLOWED:
            continue
        allowed = ALLOWED[floor] | UTILITIES | {floor}
        for imp in _imports(path, name):
            target = _package(imp)
            if imp in ("pasd_jax",) or target == floor:
                continue
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(REPO)} ({floor}) imports {imp} ({target})")
    print("\n".join(bad))
    assert not bad


def test_sampling_and_convert_never_import_train():
    for name, path in _modules().items():
        if _package(name) in ("pasd_jax.sampling", "pasd_jax.convert", "pasd_jax.runs"):
            assert not any(i.startswith("pasd_jax.train") for i in _imports(path, name)), path


def test_no_import_circle():
    """Module-level imports between our modules form no cycle (lazy imports inside functions are not counted)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path, name, top_level_only=True):
            while imp and imp not in modules:  # `from pkg import name` may name a symbol, not a module
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    # a package's __init__ importing its own submodules is how packages re-export; drop those edges
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state, cycle = {}, []

    def visit(n, stack):
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycle.append(stack[stack.index(d):] + [d] if d in stack else [n, d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    print(cycle[:5])
    assert not cycle


@pytest.mark.parametrize("root", ["pasd_jax", "data_pipeline"])
def test_files_are_short(root):
    long = {str(p.relative_to(REPO)): n for p in (REPO / root).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(REPO)) not in LONG_FILES}
    assert not long, f"files over {MAX_LINES} lines (split them, or list them in LONG_FILES with a reason): {long}"
