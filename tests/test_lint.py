"""The code gates run with the tests: ``ruff check`` over the package, tests and scripts, and the import
contracts in pyproject.toml (layers, no circles) with import-linter."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a dev dependency (pip install -e '.[dev]')"
    result = subprocess.run([ruff, "check", "nemo_controlnet", "tests", "scripts", "examples"], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert tool, "import-linter is a dev dependency (pip install -e '.[dev]')"
    # PYTHONPATH first: the package under cwd is analysed, not an installed one.
    return subprocess.run([tool, str(cwd / "pyproject.toml")], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(cwd)})  # fmt: skip


def test_import_layers_and_no_circles():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    # loading must need neither training nor prep; prep must not need training
    ("data/decode.py", "import nemo_controlnet.training.module", "layers, top to bottom"),
    ("prep/sources.py", "import nemo_controlnet.training.run", "layers, top to bottom"),
    ("data/webdataset.py", "import nemo_controlnet.prep.writer", "layers, top to bottom"),
    ("prep/shards.py", "import nemo_controlnet.prep.job", "no import circles"),  # job imports shards
])  # fmt: skip
def test_the_contracts_catch_a_new_layer_violation_or_circle(tmp_path, module, line, contract):
    shutil.copytree(REPO / "nemo_controlnet", tmp_path / "nemo_controlnet",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "nemo_controlnet" / module
    target.write_text(target.read_text() + f"\n{line}  # injected\n")
    result = _lint_imports(tmp_path)
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith("BROKEN")]
    assert result.returncode != 0 and any(ln.startswith(contract) for ln in broken), result.stdout
