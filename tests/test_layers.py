"""The stage order holds: every import, function-local ones included, points downwards.

The contract is ``.importlinter`` (import-linter's layers contract). import-linter reads
a package from one folder, while conilium maps its sub-packages from several top-level
folders (setup.cfg ``package_dir``); the test therefore lays the sources out as an
installed copy would (``conilium/``, ``conilium/extract/``, ...) in a temporary folder
and lints that copy.
"""

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def installed_layout(dest: Path) -> Path:
    """Copy every package's .py files to where an installation would put them."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    mapping = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        pkg, folder = (s.strip() for s in line.split("="))
        mapping[pkg] = folder
    for pkg, folder in mapping.items():
        target = dest.joinpath(*pkg.split("."))
        for src in (ROOT / folder).rglob("*.py"):
            rel = src.relative_to(ROOT / folder)
            if rel.parts[0] in mapping.values() or "__pycache__" in rel.parts:
                continue
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
    return dest


def lint(tmp_path: Path) -> subprocess.CompletedProcess:
    src = installed_layout(tmp_path / "src")
    exe = Path(sys.executable).parent / "lint-imports"
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run([str(exe), str(ROOT / ".importlinter"), "--no-cache"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_every_import_follows_the_stage_order(tmp_path):
    if not (Path(sys.executable).parent / "lint-imports").exists():
        pytest.skip("import-linter is not installed (pip install -e .[test])")
    result = lint(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_against_the_flow_breaks_the_contract(tmp_path, monkeypatch):
    """A function-local import of evaluate from heads is caught (the check can fail)."""
    if not (Path(sys.executable).parent / "lint-imports").exists():
        pytest.skip("import-linter is not installed (pip install -e .[test])")
    src = installed_layout(tmp_path / "src")
    bad = src / "conilium" / "heads" / "model.py"
    bad.write_text(bad.read_text() + "\n\ndef _against_the_flow():\n    from conilium.evaluate import report\n")
    exe = Path(sys.executable).parent / "lint-imports"
    env = dict(os.environ, PYTHONPATH=str(src))
    result = subprocess.run([str(exe), str(ROOT / ".importlinter"), "--no-cache"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "conilium.heads.model -> conilium.evaluate.report" in result.stdout
