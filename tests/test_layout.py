"""The project's layering, checked on the source: which packages may import Ray and MLflow, no
import circles, and short functions in pipeline/ and the config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cpm_model", "preprocessing", "pipeline")
# Plain code: runs without Ray or MLflow (the single-process loop, the maths, the data, drawing).
PLAIN = ("cpm_model", "preprocessing", "pipeline/train", "pipeline/figures.py", "pipeline/cli.py")
ORCHESTRATION = ("ray", "mlflow")
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files(*roots: str) -> list[Path]:
    files = []
    for root in roots:
        path = REPO / root
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in the file names (at module level or inside a function),
    with relative imports resolved."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def project_graph() -> dict[str, set[str]]:
    files = source_files(*PACKAGES)
    names = {module_name(path) for path in files}
    return {module_name(path): {m for m in imported_modules(path) if m in names and m != module_name(path)}
            for path in files}


def test_plain_code_imports_neither_ray_nor_mlflow():
    offenders = [f"{path.relative_to(REPO)} imports {module}" for path in source_files(*PLAIN)
                 for module in sorted(imported_modules(path)) if module.split(".")[0] in ORCHESTRATION]
    assert not offenders, offenders


def test_the_training_loop_needs_nothing_of_the_sweep_the_tracking_or_the_reports():
    graph = project_graph()
    offenders = [f"{name} -> {target}" for name, targets in graph.items() if name.startswith("pipeline.train")
                 for target in targets
                 if target.startswith(("pipeline.distributed", "pipeline.tracking", "pipeline.reporting"))]
    assert not offenders, offenders


def test_there_is_no_import_circle():
    graph = project_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


def test_the_circle_check_finds_a_circle(tmp_path, monkeypatch):
    """The checker itself: two modules that import each other are a circle."""
    package = tmp_path / "pipeline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pipeline import b\n")
    (package / "b.py").write_text("from . import a\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    graph = project_graph()
    assert "pipeline.b" in graph["pipeline.a"] and "pipeline.a" in graph["pipeline.b"]
    with pytest.raises(AssertionError, match="pipeline.a -> pipeline.b -> pipeline.a"):
        test_there_is_no_import_circle()


def test_functions_in_pipeline_are_short_or_say_why():
    """A function of more than about a screen must say in its docstring why it is long."""
    long = []
    for path in source_files("pipeline", "cpm_model/config.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                reason = "long because" in (ast.get_docstring(node) or "").lower()
                if lines > MAX_FUNCTION_LINES and not reason:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
