"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and they catch a cycle: a copy of the
package with one upward import (which closes a cycle) must fail them."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 kept, 0 broken" in r.stdout


def test_an_import_cycle_breaks_the_contracts(tmp_path):
    # the same sources laid out as the installed namespace, first on the path
    pkg = tmp_path / "src" / "ganforge"
    for room in ("flows", "tasks", "models"):
        shutil.copytree(ROOT / room, pkg / room, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path, tmp_path / "src").returncode == 0  # the copy itself is clean
    io = pkg / "tasks" / "io.py"
    io.write_text(io.read_text() + "\n\ndef _late():\n    from ganforge.tasks.train import train  # noqa: F401\n")
    r = _lint(tmp_path, tmp_path / "src")
    assert r.returncode != 0
    assert "ganforge.tasks.io -> ganforge.tasks.train" in r.stdout, r.stdout
