"""House rules that keep the layers readable: the shell's functions stay short (a stage reads like a recipe,
one entry function calling phases), and the cores never print (they return data; the shell reports it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_SHELL_FUNCTION_LINES = 60
CORES = ("foundation", "mining", "training", "evals")

# "<path relative to the repo>:<function>" -> why it may be longer, for now.
LONG_FUNCTIONS_ALLOWED = {
}
# "<path>:<function>" -> why it may call print().
PRINT_ALLOWED = {
    "training/export.py:_main": "the merge child process's command line (`python -m flywheel.training.export "
                                "merge`): its stdout/stderr are that process's output",
}


def _functions(path: Path):
    """(qualified name, node) of every function in `path`, nested ones included (`outer.inner`)."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")


def _modules(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def test_no_shell_function_is_longer_than_60_lines():
    too_long = []
    for path in _modules("pipelines"):
        for name, node in _functions(path):
            key = f"{path.relative_to(ROOT).as_posix()}:{name}"
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_SHELL_FUNCTION_LINES and key not in LONG_FUNCTIONS_ALLOWED:
                too_long.append(f"{key} ({lines} lines)")
    assert not too_long, ("split these at their phases (pure helpers go to the cores): " + ", ".join(too_long))


def test_the_long_function_allow_list_names_only_functions_that_exist_and_are_long():
    """An entry whose function got short (or was renamed) must leave the list, so it cannot hide a new one."""
    found = {f"{p.relative_to(ROOT).as_posix()}:{name}": node.end_lineno - node.lineno + 1
             for p in _modules("pipelines") for name, node in _functions(p)}
    stale = [k for k in LONG_FUNCTIONS_ALLOWED if found.get(k, 0) <= MAX_SHELL_FUNCTION_LINES]
    assert not stale, f"remove from LONG_FUNCTIONS_ALLOWED: {stale}"


@pytest.mark.parametrize("core", CORES)
def test_cores_do_not_print(core):
    calls = []
    for path in _modules(core):
        rel = path.relative_to(ROOT).as_posix()
        allowed = [range(node.lineno, node.end_lineno + 1) for name, node in _functions(path)
                   if f"{rel}:{name}" in PRINT_ALLOWED]
        calls += [f"{rel} line {n.lineno}" for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
                  and not any(n.lineno in r for r in allowed)]
    assert not calls, f"cores return data and the shell reports it; print() found at: {calls}"
