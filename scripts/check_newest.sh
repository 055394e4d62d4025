#!/usr/bin/env bash
# The test suite against the newest releases of every dependency (constraints.txt not used),
# in its own environment (.venv-newest): what moved since the lock is listed first, then
# the tests run. A failure here is a warning before users meet it (transformers changed the
# meaning of hidden_states once already); bash scripts/lock.sh --upgrade moves the pins once
# it passes. Run weekly by .github/workflows/newest-releases.yml.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONILIUM_VENV="${CONILIUM_VENV:-$root/.venv-newest}" CONILIUM_CONSTRAINTS=none
CONILIUM_EXTRAS="test,cluster" bash "$root/scripts/setup_env.sh"
"$CONILIUM_VENV/bin/python" - "$root/constraints.txt" <<'PY'
import re, sys
from importlib import metadata

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

pinned = {}
for line in open(sys.argv[1]):
    m = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", line)
    if m:
        pinned[norm(m.group(1))] = m.group(2)
installed = {norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
moved = sorted((n, v, installed[n]) for n, v in pinned.items() if n in installed and installed[n] != v)
print(f"newest releases: {len(moved)} of {len(pinned)} pinned packages differ from constraints.txt")
for name, old, new in moved:
    print(f"  {name}: {old} -> {new}")
PY
cd "$root"
exec "$CONILIUM_VENV/bin/python" -m pytest -q "$@"
