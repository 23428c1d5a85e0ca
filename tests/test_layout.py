"""The dependency rules of docs/design.md §2, read from the source: who may import whom.

picard_sampler knows nothing of robots, configs or the other packages; policy builds on
picard_sampler but knows no environment; envs imports none of the diffusion side (not even
torch); picard_client (client/, the robot side) and serving (its old names) import neither torch
nor the other packages; app
wires them; nothing outside tests/ imports an entry script.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = {"eval_policy", "train_pcm", "serve_policy"}
FORBIDDEN = {
    "picard_sampler": {"policy", "envs", "app", "hydra", "omegaconf", "gymnasium"},
    "policy": {"envs", "app", "gymnasium"},
    "envs": {"torch", "picard_sampler", "policy", "app"},
    "serving": {"torch", "picard_sampler", "policy", "envs", "app", "hydra", "omegaconf"},
    "client": {"torch", "picard_sampler", "policy", "envs", "app", "serving", "hydra",
               "omegaconf", "gymnasium"},  # picard_client: the robot side's own distribution
    "app": set(),
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports, at any depth (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def source_files(folder: str) -> list[Path]:
    return sorted((REPO_ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_dependency_rules(package: str) -> None:
    files = source_files(package)
    assert files, f"no sources found for {package}"
    broken = {
        str(path.relative_to(REPO_ROOT)): sorted(imported_modules(path) & forbidden)
        for path in files
        if (forbidden := FORBIDDEN[package] | ENTRY_SCRIPTS) & imported_modules(path)
    }
    assert not broken, f"{package} imports what it must not: {broken}"


def test_nothing_outside_tests_imports_an_entry_script() -> None:
    files = [
        p for p in REPO_ROOT.rglob("*.py")
        if not {".venv", "tests", ".git"} & set(p.relative_to(REPO_ROOT).parts)
    ]
    importers = sorted(
        str(p.relative_to(REPO_ROOT)) for p in files if imported_modules(p) & ENTRY_SCRIPTS
    )
    assert not importers


def test_the_rule_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    import eval_policy\n    from envs.rollout import x\n")
    assert imported_modules(source) == {"eval_policy", "envs"}


def test_entry_scripts_stay_thin() -> None:
    """The entries are Hydra wrappers: the work lives in app/ (issue: ~150 lines at most)."""
    for name in ENTRY_SCRIPTS:
        lines = (REPO_ROOT / f"{name}.py").read_text().splitlines()
        assert len(lines) <= 150, (name, len(lines))


def test_no_reference_to_a_design_file_outside_the_repository() -> None:
    """Code and configs cite docs/design.md, which ships with the repository."""
    files = [*source_files("app"), *source_files("picard_sampler"), *source_files("policy"),
             *source_files("envs"), *source_files("bench"), *source_files("scripts"),
             *source_files("serving"), *(REPO_ROOT / "conf").rglob("*.yaml"),
             *(REPO_ROOT / f"{name}.py" for name in ENTRY_SCRIPTS)]
    stale = [str(p.relative_to(REPO_ROOT)) for p in files
             if "DESIGN.md" in p.read_text().replace("docs/design.md", "")]
    assert not stale
    assert (REPO_ROOT / "docs" / "design.md").is_file()


def test_the_robot_side_client_runs_without_torch() -> None:
    """Importing serving (the client a robot process runs) loads no torch, even indirectly."""
    import subprocess
    import sys

    code = "import sys, serving; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, check=True)
    assert result.stdout.strip() == "False"


PACKAGES = {"app": REPO_ROOT / "app", "policy": REPO_ROOT / "policy",
            "picard_sampler": REPO_ROOT / "picard_sampler", "envs": REPO_ROOT / "envs",
            "serving": REPO_ROOT / "serving",
            "picard_client": REPO_ROOT / "client" / "picard_client"}
"""Each package of docs/design.md §2 and its folder (picard_client lives in client/)."""


def module_name(package: str, root: Path, path: Path) -> str:
    """`path`'s dotted module name in `package` (a package's __init__ is the package itself)."""
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(package: str, root: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports, at module level or inside
    functions (`from pkg import name` counts as importing pkg.name when that is a module)."""
    paths = {module_name(package, root, p): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        is_init = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_init]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in paths:  # pkg.mod.attr -> pkg.mod
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected
    group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:  # walk inside the group from its first module back to it
        members, path, seen = set(group), [group[0]], {group[0]}
        while True:
            options = sorted(graph[path[-1]] & members)
            if group[0] in options and len(path) > 1:
                break
            step = next((m for m in options if m not in seen), group[0])
            if step == group[0]:
                break
            path.append(step)
            seen.add(step)
        cycles.append([*path, group[0]])
    return cycles


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles_inside_a_package(package: str) -> None:
    """Modules of one package import each other one way only (function-level imports count:
    they hide a cycle, they do not remove it)."""
    cycles = import_cycles(internal_imports(package, PACKAGES[package]))
    assert not cycles, f"import cycles in {package}: " + "; ".join(
        " -> ".join(cycle) for cycle in cycles)


def test_the_cycle_finder_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkg.b import f\n")
    (root / "b.py").write_text("def f():\n    from . import c\n")
    (root / "c.py").write_text("import pkg.a\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "d.py").write_text("from ..a import x\nfrom pkg.sub import e\n")
    (root / "sub" / "e.py").write_text("")
    graph = internal_imports("pkg", root)
    assert graph["pkg.sub.d"] == {"pkg.a", "pkg.sub", "pkg.sub.e"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
