#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with every dependency.
# Sourced by run_all.sh and run_tests.sh; safe to run by hand. Re-installs only when
# setup.cfg changed since the last install.
#   PYTHON=python3.11        interpreter used to create the environment
#   CONILIUM_TORCH="torch==2.13.0"  the torch requirement installed first (pick a CUDA build here)
#   CONILIUM_VENV=.venv      where the environment lives
#   CONILIUM_EXTRAS=test     the extras installed with conilium (run_tests.sh adds cluster: dask, ray)
#   CONILIUM_CONSTRAINTS=constraints.txt  the pinned versions installed (scripts/lock.sh writes
#                            them); "none" installs the newest releases setup.cfg allows
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CONILIUM_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.conilium-installed"
extras="${CONILIUM_EXTRAS:-test}"
constraints="${CONILIUM_CONSTRAINTS:-$root/constraints.txt}"
pins=()
if [ "$constraints" != "none" ]; then
  [ -f "$constraints" ] || { echo "[setup] CONILIUM_CONSTRAINTS: no file $constraints" >&2; exit 1; }
  pins=(-c "$constraints")
fi
want="$( (cat "$root/setup.cfg" "$root/pyproject.toml"; [ "$constraints" = "none" ] && echo none || cat "$constraints") \
  | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ -x "$venv/bin/python" ]; then
  read -r have have_extras < "$stamp" || true
  missing=""
  for e in ${extras//,/ }; do
    case ",${have_extras:-}," in *",$e,"*) ;; *) missing="$missing $e" ;; esac
  done
  if [ "${have:-}" = "$want" ] && [ -z "$missing" ]; then
    exit 0
  fi
  # keep what was installed before: the union of the extras
  for e in ${have_extras//,/ }; do
    case ",$extras," in *",$e,"*) ;; *) extras="$extras,$e" ;; esac
  done
fi
echo "[setup] preparing the virtual environment in $venv (first run takes a few minutes)" >&2
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet ${pins[@]+"${pins[@]}"} "${CONILIUM_TORCH:-torch==2.13.0}"
fi
"$venv/bin/python" -m pip install --quiet ${pins[@]+"${pins[@]}"} -e "$root[$extras]"
echo "$want $extras" > "$stamp"
echo "[setup] environment ready" >&2
