"""The package's one-way data flow is checked, not only described: import-linter's contracts in ``pyproject.toml``
(the layers weights -> spectra -> pipeline -> training -> views, and no circle of modules importing each other)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> list[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    return [exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"]


def test_import_contracts_are_kept():
    out = subprocess.run(_lint_imports(), capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_a_lower_stage_importing_a_higher_one_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the package where the spectra import the callback is refused."""
    shutil.copytree(ROOT / "lightning_htsr", tmp_path / "lightning_htsr")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "lightning_htsr" / "spectra" / "metrics.py"
    bad.write_text(bad.read_text() + "\nfrom ..training import stopping  # noqa: E402,F401\n")
    cmd = _lint_imports()
    cmd[cmd.index("--config") + 1] = str(tmp_path / "pyproject.toml")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)})
    assert out.returncode != 0
    assert "lightning_htsr.spectra.metrics -> lightning_htsr.training.stopping" in out.stdout
