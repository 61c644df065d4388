"""The repository's layout holds together: one import namespace (`ca2vdm.server`, `ca2vdm.kernels`,
`ca2vdm.client`) over the top-level folders, no import cycles, and a README layout table that matches the tree."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"server": "ca2vdm.server", "kernels": "ca2vdm.kernels", "client": "ca2vdm.client"}
OLD_NAMES = ("server", "kernels", "client")


def python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    return [ROOT / name for name in out if (ROOT / name).is_file()]


def module_name(path: Path) -> str | None:
    """The installed name of a file of the package (None for tests, bench, scripts)."""
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "ca2vdm":
        prefix = ["ca2vdm"]
    elif parts[0] in FOLDERS:
        prefix = FOLDERS[parts[0]].split(".")
    else:
        return None
    parts = prefix + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_pyproject_lists_every_folder_of_the_package():
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {"ca2vdm": "ca2vdm", **{v: k for k, v in FOLDERS.items()}}
    expected = {"ca2vdm"}
    for folder, name in FOLDERS.items():
        for d in [ROOT / folder, *(ROOT / folder).rglob("*")]:
            if d.is_dir() and d.name != "__pycache__" and any(f.is_file() for f in d.iterdir()):
                expected.add(".".join([name, *d.relative_to(ROOT / folder).parts]))
    assert set(setup["packages"]) == expected


def test_the_wheel_installs_one_namespace(built_wheel, tmp_path):
    names = zipfile.ZipFile(built_wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"ca2vdm", "ca2vdm-0.1.0.dist-info"}, top
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target),
                    str(built_wheel)], check=True)  # fmt: skip
    script = (
        "import importlib, ca2vdm, ca2vdm.server.cli, ca2vdm.client, ca2vdm.kernels.adaln\n"
        f"assert ca2vdm.server.cli.__file__.startswith({str(target)!r}), ca2vdm.server.cli.__file__\n"
        "for old in ('server', 'kernels', 'client'):\n"
        "    try:\n"
        "        importlib.import_module(old)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'import {old} works')\n"
        "print(ca2vdm.__version__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "0.1.0", result.stdout + result.stderr


def test_nothing_imports_the_folders_by_their_old_top_level_names():
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in OLD_NAMES]
    assert not offenders, offenders


def _module_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Modules imported when `module` is executed (function bodies and `if TYPE_CHECKING:` blocks excluded)."""
    found: set[str] = set()

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                found.add(source)
                found.update(f"{source}.{a.name}" for a in node.names)  # `from pkg import submodule`
            elif isinstance(node, ast.If):
                test = node.test
                if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)

    visit(tree.body)
    return found


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for path in python_files():
        name = module_name(path)
        if name is not None:
            graph[name] = _module_level_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}

    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert len(graph) > 50 and "ca2vdm.server.engine.engine" in graph
    assert not cycles, cycles


def test_readme_layout_table_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    paths = re.findall(r"^\| `([^`]+)` \|", section, re.M)
    assert paths, "no layout table under ## Layout"
    for p in paths:
        assert (ROOT / p.rstrip("/")).exists(), f"README layout names {p}, which does not exist"
    listed = {p.rstrip("/") for p in paths}
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    top_dirs = {t.split("/")[0] for t in tracked if "/" in t and not t.startswith(".")}
    subpackages = {f"server/{d.name}" for d in (ROOT / "server").iterdir() if (d / "__init__.py").is_file()}
    covered = listed | {p.split("/")[0] for p in listed}  # server/ is listed through its parts
    missing = sorted((top_dirs | subpackages) - covered)
    assert not missing, f"README layout table lacks {missing}"
