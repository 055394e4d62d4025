#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with every dependency.
# Sourced by run_all.sh and run_tests.sh; safe to run by hand. Re-installs only when
# setup.cfg changed since the last install.
#   PYTHON=python3.11        interpreter used to create the environment
#   CONILIUM_TORCH="torch==2.13.0"  the torch requirement installed first (pick a CUDA build here)
#   CONILIUM_VENV=.venv      where the environment lives
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CONILIUM_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.conilium-installed"
want="$(cat "$root/setup.cfg" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
echo "[setup] preparing the virtual environment in $venv (first run takes a few minutes)" >&2
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet "${CONILIUM_TORCH:-torch==2.13.0}"
fi
"$venv/bin/python" -m pip install --quiet -e "$root[test]"
echo "$want" > "$stamp"
echo "[setup] environment ready" >&2
