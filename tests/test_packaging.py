"""The wheel ships the task YAMLs and declares `layered` for lm-eval's plugin discovery."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (path,) = out.glob("lm_eval_layers-*.whl")
    return path


def test_wheel_ships_the_tasks_and_the_entry_point(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        z.extractall(tmp_path / "site")
    shipped = {n for n in names if n.startswith("lm_eval_layers/tasks/")}
    in_repo = {f"lm_eval_layers/tasks/{p.relative_to(REPO / 'tasks').as_posix()}" for p in (REPO / "tasks").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert in_repo and in_repo <= shipped
    assert "lm_eval_layers.pth" in names
    assert "[lm_eval.models]\nlayered = lm_eval_layers.model:LayeredLM" in entry_points
    # Installed from the wheel (not editable), the tasks are found next to the package.
    proc = subprocess.run([sys.executable, "-m", "lm_eval_layers.task_suite"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""}, check=True)
    assert Path(proc.stdout.strip()) == tmp_path / "site" / "lm_eval_layers" / "tasks"


def test_installed_entry_point_loads_layered():
    (entry,) = [e for e in importlib.metadata.entry_points(group="lm_eval.models") if e.name == "layered"]
    from lm_eval_layers.model import LayeredLM

    assert entry.load() is LayeredLM


def _library_imports() -> dict[str, set[str]]:
    """Every library module and the modules it imports anywhere in its body (module level or
    inside a function: a function-level import hides a circle, it does not remove it)."""
    import ast

    modules = {}
    for path in (REPO / "lm_eval_layers").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = {m for m in imported if m != name and (m in modules or m.split(".")[0] == "surgery")}
    return graph


def test_the_library_never_imports_the_cli_and_has_no_import_circles():
    graph = _library_imports()
    assert not {m: sorted(d for d in deps if d.startswith("surgery")) for m, deps in graph.items()
                if any(d.startswith("surgery") for d in deps)}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import circle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_the_command_line_starts_without_torch_transformers_or_lm_eval():
    code = "import sys, surgery.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'lm_eval', 'datasets'}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout
