#!/usr/bin/env bash
# Run the test suite (sets up .venv first when needed). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONILIUM_EXTRAS="${CONILIUM_EXTRAS:-test,cluster}" bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${CONILIUM_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
