"""Every repository path that README.md, docs/*.md, bench/README.md or a module docstring of
src/opdlab names exists, and every local markdown link (and its #anchor) resolves.

What counts as a path (see `cited_paths`):
- a markdown link or image target that is not a URL: resolved against the linking file's folder,
  its `#anchor` checked against the target's headings (GitHub's slug rule);
- a token starting with a top-level folder of the repository (`docs/`, `src/`, `bench/`, `tests/`,
  `.ci/`) or naming `README.md`: resolved against the repository root;
- in a module docstring or a doc, a `.py` path with a folder (`recipes/demo_vlm.py`): resolved
  against the repository root, then against `src/opdlab/`;
- a dotted name `opdlab.pkg.module[.name]`: the module must exist under `src/`, and a name after it
  must be defined at the top level of that module (read with `ast`, nothing is imported).
Tokens with placeholders (`<size>`, `*`, `…`, `NAME`) are templates, not paths, and are skipped.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_FOLDERS = ("docs", "src", "bench", "tests", ".ci")

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_ROOTED = re.compile(r"(?<![\w./$~-])((?:" + "|".join(re.escape(f) for f in TOP_FOLDERS)
                     + r")/[\w./<>*…-]*|README\.md)")
_PY_PATH = re.compile(r"(?<![\w./$~-])((?:[\w-]+/)+[\w-]+\.py)\b")
_DOTTED = re.compile(r"(?<![\w.])opdlab(?:\.[A-Za-z_]\w*)+")
_PLACEHOLDER = re.compile(r"[<>*…]|\bNAME\b|\bN\b")


def _top_level_names(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def dotted_problem(name: str, root: Path) -> str | None:
    """Why `opdlab.a.b[.attr]` does not resolve under `root/src`, or None when it does."""
    parts = name.split(".")
    module, k = None, 0
    for i in range(1, len(parts) + 1):
        base = root / "src" / Path(*parts[:i])
        found = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if not found.is_file():
            break
        module, k = found, i
    if module is None:
        return "no such module"
    rest = parts[k:]
    if rest and rest[0] not in _top_level_names(module):
        if module.name == "__init__.py":
            return f"no module or name {'.'.join(parts[:k + 1])}"
        return f"{'.'.join(parts[:k])} defines no {rest[0]}"
    return None


def _doc_files(root: Path) -> list[Path]:
    files = [root / "README.md", root / "bench" / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def _module_docstrings(root: Path) -> list[tuple[Path, str]]:
    out = []
    for path in sorted((root / "src" / "opdlab").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
        if doc:
            out.append((path, doc))
    return out


def _strip_code_fences(text: str) -> str:
    """Fenced code blocks hold commands and example output (`--out runs/opd`), not citations."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _clean(token: str) -> str:
    return token.rstrip(".,;:)'\"`")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", _strip_code_fences(md.read_text(encoding="utf-8")),
                                                   flags=re.M)}


def cited_paths(text: str, source: Path, root: Path, markdown: bool) -> list[str]:
    """Problems with the paths `text` (from file `source`) cites: one message per missing path."""
    problems = []
    body = _strip_code_fences(text) if markdown else text
    if markdown:
        for m in _LINK.finditer(body):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (source.parent / file_part).resolve() if file_part else source
            if not dest.exists():
                problems.append(f"{source.relative_to(root)}: link to {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{source.relative_to(root)}: link to {target} (no heading with that anchor)")
        body = _LINK.sub(" ", body)
    for m in _ROOTED.finditer(body):
        token = _clean(m.group(1))
        if _PLACEHOLDER.search(token):
            continue
        if not (root / token).exists():
            problems.append(f"{source.relative_to(root)}: names {token} (no such path)")
    for m in _PY_PATH.finditer(body):
        token = _clean(m.group(1))
        if token.split("/")[0] in TOP_FOLDERS or _PLACEHOLDER.search(token):
            continue  # rooted tokens were checked above
        if not any((base / token).exists() for base in (root, root / "src" / "opdlab", source.parent)):
            problems.append(f"{source.relative_to(root)}: names {token} (not under the repository root "
                            "or src/opdlab/)")
    for m in _DOTTED.finditer(body):
        name = m.group(0).rstrip(".")
        why = dotted_problem(name, root)
        if why:
            problems.append(f"{source.relative_to(root)}: names {name} ({why})")
    return problems


def dangling_paths(root: Path) -> list[str]:
    problems = []
    for md in _doc_files(root):
        problems += cited_paths(md.read_text(encoding="utf-8"), md, root, markdown=True)
    for module, doc in _module_docstrings(root):
        problems += cited_paths(doc, module, root, markdown=False)
    return problems


def test_every_path_the_docs_and_docstrings_cite_exists():
    problems = dangling_paths(ROOT)
    assert not problems, "dangling paths:\n" + "\n".join(problems)


def _fake_repo(tmp_path: Path, readme: str, doc: str = "# Doc\n\n## A section\n", module: str = '"""ok"""\n') -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text(doc)
    (tmp_path / "README.md").write_text(readme)
    pkg = tmp_path / "src" / "opdlab" / "recipes"
    pkg.mkdir(parents=True)
    (pkg / "demo.py").write_text(module)
    for init in (pkg.parent / "__init__.py", pkg / "__init__.py"):
        init.write_text('"""A package."""\n')
    return tmp_path


def test_the_scan_passes_paths_that_exist(tmp_path):
    root = _fake_repo(tmp_path, "See `docs/real.md`, [real](docs/real.md#a-section) and [top](#top); "
                      "`opdlab.recipes.demo.main` and `opdlab.recipes`.\n\n# Top\n",
                      module='"""Runs recipes/demo.py; see docs/real.md."""\n\ndef main():\n    pass\n')
    assert dangling_paths(root) == []


@pytest.mark.parametrize("readme, module, expected", [
    ("See `docs/demo.md`.\n", '"""ok"""\n', "README.md: names docs/demo.md"),
    ("See [the demo](docs/demo.md).\n", '"""ok"""\n', "README.md: link to docs/demo.md (no such file)"),
    ("See [real](docs/real.md#no-such-part).\n", '"""ok"""\n', "no heading with that anchor"),
    ("ok\n", '"""Details in docs/demo.md."""\n', "src/opdlab/recipes/demo.py: names docs/demo.md"),
    ("ok\n", '"""See recipes/demo_vlm.py."""\n', "names recipes/demo_vlm.py"),
    ("Sampling is in `opdlab.dist.sampling`.\n", '"""ok"""\n', "opdlab.dist.sampling (no module or name opdlab.dist)"),
    ("Use `opdlab.recipes.demo.run_all()`.\n", '"""ok"""\n', "opdlab.recipes.demo defines no run_all"),
])
def test_the_scan_finds_a_planted_dangling_path(tmp_path, readme, module, expected):
    problems = dangling_paths(_fake_repo(tmp_path, readme, module=module))
    assert len(problems) == 1 and expected in problems[0], problems


def test_templates_and_code_blocks_are_not_paths(tmp_path):
    readme = "Results in `bench/results/profile_<size>.json`.\n\n```\nopdlab distill --out docs/made-up\n```\n"
    assert dangling_paths(_fake_repo(tmp_path, readme)) == []


def test_ci_runs_the_readme_test_command_first_and_exactly():
    """The README promises that its test command passes on a fresh machine; `.ci/run` checks that
    promise only if it runs that very line before it installs anything else."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line for line in readme.splitlines() if line.rstrip().endswith("python -m pytest -q")]
    assert len(commands) == 1, commands
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert commands[0] in ci, "the README's test command is not a line of .ci/run"
    first_install = next(i for i, line in enumerate(ci) if "pip install" in line or "apt-get" in line)
    assert ci[first_install] == commands[0], f".ci/run installs something before the README's command: {ci[first_install]}"
