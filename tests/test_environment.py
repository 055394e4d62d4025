"""The locked environment: constraints.txt pins every dependency that setup.cfg declares
(torch excepted: CONILIUM_TORCH picks the build), scripts/setup_env.sh installs from it, and
the environment the tests run in holds exactly those versions."""

import configparser
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def _declared():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in ("test", "cluster"):
        lines += cfg["options.extras_require"][extra].splitlines()
    return {_norm(re.match(r"[A-Za-z0-9._-]+", s.strip()).group(0)) for s in lines if s.strip()}


def test_constraints_pin_every_declared_dependency_but_torch():
    pins = _pins()
    missing = sorted(_declared() - {"torch"} - set(pins))
    assert not missing, f"constraints.txt lacks {missing}: run bash scripts/lock.sh"
    assert "torch" not in pins and len(pins) > 50


@pytest.mark.skipif(os.environ.get("CONILIUM_CONSTRAINTS") == "none",
                    reason="an environment of the newest releases (scripts/check_newest.sh)")
def test_the_tests_run_in_the_locked_environment():
    pins = _pins()
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    declared = _declared() - {"torch"}
    differ = {n: (pins[n], installed.get(n)) for n in declared if installed.get(n) != pins[n]}
    assert not differ, f"installed versions differ from constraints.txt (pinned, installed): {differ}"


def test_setup_env_installs_from_the_constraints_and_refuses_a_missing_file(tmp_path):
    text = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert '-c "$constraints"' in text and 'root/constraints.txt' in text
    r = subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                       env=dict(os.environ, CONILIUM_VENV=str(tmp_path / "venv"),
                                CONILIUM_CONSTRAINTS=str(tmp_path / "nothing.txt")))
    assert r.returncode == 1 and f"no file {tmp_path / 'nothing.txt'}" in r.stderr
    assert not (tmp_path / "venv").exists()
