"""The package's layering: simgan_dist.core (the algorithm, models, losses) runs without Ray or DeepSpeed.

Two views of the same rule. The static one follows every `import` statement, at any depth
(a function's lazy `import ray` counts), from each core module through the simgan_dist modules
it reaches. The dynamic one imports every core module in a fresh interpreter and looks at
sys.modules, which also catches a third-party package that pulls Ray in behind our back.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = "simgan_dist"
ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / PACKAGE / "core"
FORBIDDEN = ("ray", "deepspeed")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _source(module: str) -> Path | None:
    """The file of a simgan_dist module (a package's __init__.py), or None (a name inside a module)."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _packages_of(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(path: Path, module: str) -> set[str]:
    """Every module an import statement anywhere in `path` names (relative imports resolved), but
    those under `if TYPE_CHECKING:` (annotations only, never run)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            # `from simgan_dist.core import losses` imports the module simgan_dist.core.losses
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def forbidden_imports(start: str) -> dict[str, list[str]]:
    """{forbidden top-level package: the chain of simgan_dist modules from `start` that imports it}."""
    found: dict[str, list[str]] = {}
    chains = {start: [start]}
    queue = [start]
    while queue:
        module = queue.pop(0)
        path = _source(module)
        if path is None:
            continue
        for name in sorted(imports_of(path, module)):
            top = name.split(".")[0]
            if top in FORBIDDEN:
                found.setdefault(top, [*chains[module], name])
            elif top == PACKAGE:
                for reached in (*_packages_of(name), name):
                    if reached not in chains and _source(reached) is not None:
                        chains[reached] = [*chains[module], reached]
                        queue.append(reached)
    return found


def import_cycles() -> list[list[str]]:
    """The simgan_dist modules that import each other in a ring (strongly connected components > 1)."""
    modules = {_module_name(p) for p in (ROOT / PACKAGE).rglob("*.py")}
    graph = {m: {r for name in imports_of(_source(m), m) for r in (*_packages_of(name), name)
                 if r in modules and r != m and not m.startswith(r + ".")} for m in modules}
    order, low, stack, cycles = {}, {}, [], []

    def visit(module: str) -> None:  # Tarjan's algorithm
        order[module] = low[module] = len(order)
        stack.append(module)
        for other in graph[module]:
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            ring = []
            while not ring or ring[-1] != module:
                ring.append(stack.pop())
            if len(ring) > 1:
                cycles.append(sorted(ring))

    for module in sorted(modules):
        if module not in order:
            visit(module)
    return cycles


def core_modules() -> list[str]:
    return sorted(_module_name(p) for p in CORE.rglob("*.py"))


def test_core_modules_are_found():
    modules = core_modules()
    assert {"simgan_dist.core.algorithm", "simgan_dist.core.models", "simgan_dist.core.losses"} <= set(modules)


def test_the_static_walk_sees_imports_at_any_depth(tmp_path):
    """The walker itself: a lazy import inside a function and a relative import are both seen."""
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom . import sibling\ndef f():\n    import ray.data\n    from deepspeed import x\n")
    assert {"os", "simgan_dist.core.sibling", "ray.data", "deepspeed", "deepspeed.x"} <= imports_of(
        source, "simgan_dist.core.m")


def test_core_imports_neither_ray_nor_deepspeed_statically():
    offenders = {module: found for module in core_modules() if (found := forbidden_imports(module))}
    assert not offenders, "simgan_dist.core must run without Ray and DeepSpeed; import chains: " + json.dumps(
        offenders, indent=1)


def test_core_imports_neither_ray_nor_deepspeed_at_run_time():
    script = (
        "import importlib, json, sys\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert not loaded, f"importing simgan_dist.core loaded {len(loaded)} modules of {FORBIDDEN}: {loaded[:10]}"


def test_the_package_has_no_import_cycles():
    assert not import_cycles(), f"modules importing each other: {import_cycles()}"
