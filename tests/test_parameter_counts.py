"""No function takes more than MAX_PARAMETERS parameters (issue 32): settings travel as records.

A long knob list threaded through several layers is how one more setting costs five edits; a
frozen record checked where it is defined (SamplerSettings, CallInputs, RealtimeSettings,
EpisodeSpec, ...) costs one. The rule covers every function outside tests/, bench/ and
scripts/, read from the source; `self` / `cls` are not counted, `*args` and `**kwargs` count
one each.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PARAMETERS = 10
NOT_COVERED = {"tests", "bench", "scripts", ".venv", ".git"}

EXPORTED_SAMPLER_FUNCTIONS = {
    "picard_sampler/samplers.py::picard_sample",
    "picard_sampler/samplers.py::pcm_sample",
}
"""picard_sampler's documented sampler functions keep their keyword knobs (public API, as
k-diffusion's samplers do); they build the records and hand them on."""

def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
    """Parameters of a def as a caller sees them: `self` / `cls` of a method not counted,
    `*args` and `**kwargs` one each."""
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    count = len(names) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
    is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod"
                    for d in node.decorator_list)
    if in_class and not is_static and names and names[0] in ("self", "cls"):
        count -= 1
    return count


def functions(tree: ast.AST, prefix: str = "", in_class: bool = False
              ) -> Iterator[tuple[str, int]]:
    """(qualified name, parameter count) of every def in `tree`, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.", in_class=True)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}{node.name}", parameter_count(node, in_class)
            yield from functions(node, f"{prefix}{node.name}.<locals>.", in_class=False)
        else:
            yield from functions(node, prefix, in_class)


def covered_files() -> list[Path]:
    return sorted(p for p in REPO_ROOT.rglob("*.py")
                  if not NOT_COVERED & set(p.relative_to(REPO_ROOT).parts))


def counts() -> dict[str, int]:
    """{'path::qualified name': parameters} of every covered function."""
    found = {}
    for path in covered_files():
        relative = path.relative_to(REPO_ROOT).as_posix()
        for name, count in functions(ast.parse(path.read_text(), filename=str(path))):
            found[f"{relative}::{name}"] = count
    return found


def test_no_function_takes_more_than_ten_parameters() -> None:
    over = {name: n for name, n in counts().items()
            if n > MAX_PARAMETERS and name not in EXPORTED_SAMPLER_FUNCTIONS}
    assert not over, (f"functions over {MAX_PARAMETERS} parameters (group settings into a "
                      f"record): {over}")


def test_the_exported_sampler_functions_are_what_the_exception_names() -> None:
    """The permanent exception names functions that exist, are exported by picard_sampler and
    are over the limit (else it is stale and goes)."""
    import picard_sampler

    found = counts()
    for name in EXPORTED_SAMPLER_FUNCTIONS:
        assert found.get(name, 0) > MAX_PARAMETERS, name
        assert name.split("::")[1] in picard_sampler.__all__, name


def test_the_counter_skips_self_and_counts_star_arguments(tmp_path: Path) -> None:
    source = ("class A:\n"
              "    def m(self, a, b=1, *args, c, **kwargs): pass\n"
              "    @staticmethod\n"
              "    def s(self, a): pass\n"
              "def f(a, /, b, *, c):\n"
              "    def inner(x): pass\n")
    assert dict(functions(ast.parse(source))) == {
        "A.m": 5, "A.s": 2, "f": 3, "f.<locals>.inner": 1}
    assert covered_files() and not any(
        "tests" in p.relative_to(REPO_ROOT).parts for p in covered_files())
