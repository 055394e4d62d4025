#!/usr/bin/env bash
# Re-resolve constraints.txt, the pinned versions that scripts/setup_env.sh (run_all.sh,
# run_tests.sh, CI) installs: every dependency of conilium and of its test and cluster extras,
# resolved by pip-tools' pip-compile. torch is left out: CONILIUM_TORCH picks it (a CPU or a
# CUDA build); its own dependencies are pinned.
#   bash scripts/lock.sh              keep today's pins where they still fit setup.cfg
#   bash scripts/lock.sh --upgrade    move every pin to the newest release (then run the tests)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
"${PYTHON:-python3}" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet pip-tools
cd "$root"
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tools/venv/bin/pip-compile" --quiet --extra test --extra cluster --strip-extras --no-emit-index-url \
  --no-emit-find-links --output-file constraints.txt "$@" \
  pyproject.toml
# drop torch's pin and the comment lines under it
"$tools/venv/bin/python" - <<'PY'
import re
lines = open("constraints.txt").read().splitlines(keepends=True)
out, skip = [], False
for line in lines:
    if re.match(r"torch==", line):
        skip = True
        continue
    if skip and line.startswith("    "):
        continue
    skip = False
    out.append(line)
open("constraints.txt", "w").write("".join(out))
PY
echo "constraints.txt: $(grep -c '==' constraints.txt) pinned packages" >&2
