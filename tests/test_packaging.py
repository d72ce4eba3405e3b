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
