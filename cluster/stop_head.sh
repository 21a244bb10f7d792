#!/usr/bin/env bash
# Stop the local Ray head started by cluster/start_head.sh.
# Note: `ray stop` stops every Ray process of the current user on this machine.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$repo/.venv/bin/ray" ]]; then
  RAY="$repo/.venv/bin/ray"
elif command -v ray >/dev/null 2>&1; then
  RAY="$(command -v ray)"
else
  echo "error: no Ray CLI found (.venv/bin/ray or ray on PATH)" >&2
  exit 1
fi

"$RAY" stop "$@"
