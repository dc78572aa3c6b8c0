"""Imports run one way and no import cycle remains (issue 23 item 7): tools/lint_imports.py runs
import-linter's contracts (.importlinter) on the installed layout and looks for cycles. The checker
is also shown to catch what it is there to catch: a planted upward import and a planted cycle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "lint_imports.py"


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--root", str(root)], capture_output=True,
                          text=True, timeout=600)


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    for name in ("finelake", "jobs", "udfs", "models"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", dst / ".importlinter")
    return dst


@pytest.mark.slow
def test_imports_run_one_way_and_no_cycle_remains():
    r = _check(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "BROKEN" not in r.stdout and "no import cycle" in r.stdout


@pytest.mark.slow
def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path):
    repo = _copy(tmp_path)
    # finelake.method (the pure bottom layer) importing a job breaks the layers contract
    (repo / "finelake" / "method" / "planted.py").write_text("from finelake.jobs import common\n")
    # two core modules importing each other make a cycle
    (repo / "finelake" / "planted_a.py").write_text("from finelake import planted_b\n")
    (repo / "finelake" / "planted_b.py").write_text("from finelake import planted_a\n")
    r = _check(repo)
    assert r.returncode == 1
    assert "finelake.method.planted -> finelake.jobs.common" in r.stdout
    assert "import cycle: finelake.planted_a <-> finelake.planted_b" in r.stdout
