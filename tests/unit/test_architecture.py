"""The import layers of src/opdlab (docs/architecture.md), checked on every import statement.

Every `import` / `from ... import` in the package, at module level and inside functions alike,
is mapped from its file to a layer and checked against `ALLOWED`. A failure names the file, the
line and the edge, e.g. ``src/opdlab/distill/train.py:12: distill -> cli (opdlab.cli)``.
The same walk also rejects import cycles between modules, and function-level imports of opdlab
modules that carry no comment saying why they are deferred.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "opdlab"

# Modules every layer may import: no opdlab imports of their own beyond each other.
BASE = {"opdlab", "opdlab.errors", "opdlab.fileio", "opdlab.config", "opdlab.config_loading", "opdlab.flags",
        "opdlab.devices"}
LIBRARY = ("models", "data", "distill", "analysis", "subnet", "report", "dist")

# unit -> what it may import: a unit ("base", "recipes", a library package) or one module
# ("models.gguf": that module only). Every unit may import itself. docs/architecture.md says why.
ALLOWED: dict[str, set[str]] = {
    "cli": {"base", "recipes", "dist.launch"},
    "recipes": {"base", "recipes", *LIBRARY},
    "distill": {"base", "data", "models", "subnet", "dist"},
    "subnet": {"base", "analysis"},
    "analysis": {"base", "models.gguf"},
    "models": {"base"},
    "data": {"base"},
    "dist": {"base"},
    "report": {"base"},
    "base": {"base"},
}


@dataclass(frozen=True)
class Edge:
    file: str  # relative to the repository root
    line: int
    source: str  # importing module, e.g. opdlab.distill.train
    target: str  # imported opdlab module, e.g. opdlab.dist.fsdp
    in_function: bool
    commented: bool  # a comment on the import's line or the line above it


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The layer unit of an opdlab module: base, cli, recipes or a library package."""
    if module in BASE:
        return "base"
    parts = module.split(".")
    if parts[1] in ("cli", "__main__"):
        return "cli"
    if parts[1] == "recipes" or parts[1] in LIBRARY:
        return parts[1]
    raise AssertionError(f"{module}: in no layer; add it to docs/architecture.md and to tests/unit/test_architecture.py")


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def edges_of(path: Path, text: str, root: Path, modules: set[str]) -> list[Edge]:
    """Every opdlab import in one source file (module level and function level)."""
    module = module_name(path, root)
    tree = ast.parse(text, filename=str(path))
    lines = text.splitlines()
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, path.name == "__init__.py")
            # `from opdlab.report import figures_runs` imports a module; `from opdlab import __version__` a name.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
        commented = "#" in lines[node.lineno - 1] or above.startswith("#")
        for target in dict.fromkeys(targets):
            if target == "opdlab" or target.startswith("opdlab."):
                out.append(Edge(str(Path("src") / path.relative_to(root)), node.lineno, module, target,
                                id(node) in in_function, commented))
    return out


def collect(root: Path, sources: dict[Path, str] | None = None) -> list[Edge]:
    """All opdlab import edges under `root` (or of `sources`: path -> text, for the self-tests)."""
    if sources is None:
        sources = {p: p.read_text(encoding="utf-8") for p in sorted((root / "opdlab").rglob("*.py"))}
    modules = {module_name(p, root) for p in sources}
    return [e for p, text in sources.items() for e in edges_of(p, text, root, modules)]


def allowed(source: str, target: str) -> bool:
    su, tu = unit_of(source), unit_of(target)
    if su == tu:
        return True
    for entry in ALLOWED[su]:
        if entry == tu or target == f"opdlab.{entry}" or target.startswith(f"opdlab.{entry}."):
            return True
    return False


def layer_violations(edges: list[Edge]) -> list[str]:
    return [f"{e.file}:{e.line}: {unit_of(e.source)} -> {unit_of(e.target)} ({e.source} imports {e.target})"
            for e in edges if not allowed(e.source, e.target)]


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One shortest import cycle through each module that lies on one (each cycle reported once)."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        if e.target != e.source:
            graph.setdefault(e.source, []).append(e)
    found: dict[frozenset[str], list[Edge]] = {}
    for start in sorted(graph):
        paths: dict[str, list[Edge]] = {start: []}  # breadth-first from `start`, back to `start`
        frontier, cycle = [start], None
        while frontier and cycle is None:
            nxt = []
            for node in frontier:
                for e in graph.get(node, []):
                    if e.target == start and cycle is None:
                        cycle = paths[node] + [e]
                    elif e.target not in paths:
                        paths[e.target] = paths[node] + [e]
                        nxt.append(e.target)
            frontier = nxt
        if cycle is not None:
            found.setdefault(frozenset(e.source for e in cycle), cycle)
    return list(found.values())


def _describe(cycle: list[Edge]) -> str:
    return " -> ".join(f"{e.source} ({e.file}:{e.line})" for e in cycle) + f" -> {cycle[0].source}"


def test_every_import_follows_the_layers():
    problems = layer_violations(collect(SRC))
    assert not problems, "imports that break the layers of docs/architecture.md:\n" + "\n".join(problems)


def test_no_module_imports_itself_back():
    found = cycles(collect(SRC))
    assert not found, "import cycles:\n" + "\n".join(_describe(c) for c in found)


def test_function_level_imports_of_opdlab_say_why():
    bare = [f"{e.file}:{e.line}: {e.source} imports {e.target} inside a function without a comment"
            for e in collect(SRC) if e.in_function and not e.commented]
    assert not bare, "import these at module level, or say in a comment why not:\n" + "\n".join(bare)


def test_every_module_is_in_a_layer():
    for path in (SRC / "opdlab").rglob("*.py"):
        unit_of(module_name(path, SRC))  # raises for a module outside every layer


# ---- the checker itself, on planted sources


def _planted(files: dict[str, str]) -> list[Edge]:
    root = Path("/planted/src")
    return collect(root, {root / "opdlab" / name: text for name, text in files.items()})


def test_a_planted_upward_import_is_named_with_file_and_line():
    edges = _planted({
        "cli.py": "",
        "distill/__init__.py": "",
        "distill/train.py": "import torch\n\n\ndef f():\n    from opdlab import cli  # planted\n",
    })
    assert layer_violations(edges) == ["src/opdlab/distill/train.py:5: distill -> cli (opdlab.distill.train imports opdlab.cli)"]


def test_a_planted_sideways_library_import_is_rejected_and_allowed_ones_pass():
    edges = _planted({
        "report/__init__.py": "", "report/html.py": "from opdlab.analysis.pairs import canonical_name\n",
        "analysis/__init__.py": "", "analysis/pairs.py": "from opdlab.models.gguf import as_gguf_folder\n",
        "models/__init__.py": "", "models/gguf.py": "from opdlab.errors import UserError\n",
        "models/loading.py": "", "errors.py": "",
        "subnet/__init__.py": "", "subnet/masks.py": "from opdlab.analysis import pairs\nfrom opdlab.models import loading\n",
    })
    assert layer_violations(edges) == [
        "src/opdlab/report/html.py:1: report -> analysis (opdlab.report.html imports opdlab.analysis.pairs)",
        "src/opdlab/subnet/masks.py:2: subnet -> models (opdlab.subnet.masks imports opdlab.models.loading)",
    ]


def test_a_planted_cycle_is_found_through_a_function_level_import():
    edges = _planted({
        "recipes/__init__.py": "",
        "recipes/demo.py": "from opdlab.recipes.demo_vlm import run\n",
        "recipes/demo_vlm.py": "def run():\n    from opdlab.recipes.demo import Manifest\n",
        "recipes/zoo.py": "from opdlab.recipes import demo\n",
    })
    found = cycles(edges)
    assert [sorted(e.source for e in c) for c in found] == [["opdlab.recipes.demo", "opdlab.recipes.demo_vlm"]]
    assert "src/opdlab/recipes/demo_vlm.py:2" in _describe(found[0])
    bare = [e for e in edges if e.in_function and not e.commented]
    assert [(e.file, e.line) for e in bare] == [("src/opdlab/recipes/demo_vlm.py", 2)]


def test_relative_imports_resolve_like_absolute_ones():
    edges = _planted({"data/__init__.py": "", "data/prompts.py": "from ..distill import rollout\n",
                      "distill/__init__.py": "", "distill/rollout.py": ""})
    assert [(e.source, e.target) for e in edges] == [("opdlab.data.prompts", "opdlab.distill.rollout")]
