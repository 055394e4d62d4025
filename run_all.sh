#!/usr/bin/env bash
# The whole study in one command (sets up .venv first when needed).
#   ./run_all.sh                      demo corpus, small upstreams -> results/REPORT.md
#   ./run_all.sh --corpus DIR ...     a real MSP-Podcast copy; ./run_all.sh --help for options
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/scripts/setup_env.sh"
exec "${CONILIUM_VENV:-$root/.venv}/bin/python" -m conilium.study "$@"
