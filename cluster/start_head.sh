#!/usr/bin/env bash
# Start a single-machine Ray head for the MeMo platform: dashboard/jobs API on 127.0.0.1, token auth.
#
#   cluster/start_head.sh                 # all CPUs of this machine
#   RAY_NUM_CPUS=4 cluster/start_head.sh  # cap the CPUs Ray may schedule
#   RAY_NUM_GPUS=1 cluster/start_head.sh  # advertise GPUs explicitly (else Ray auto-detects)
#   cluster/start_head.sh --include-dashboard=true   # extra args go to `ray start`
#
# Every Ray worker inherits this script's environment, so MEMO_HOME (and MLFLOW_TRACKING_URI,
# if exported before running this) are the same for all jobs submitted to this head.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Ray CLI: the project venv if it exists, else whatever is on PATH.
if [[ -x "$repo/.venv/bin/ray" ]]; then
  RAY="$repo/.venv/bin/ray"
  ray_hint=".venv/bin/ray"
  # Job entrypoints (`python jobs/...`) are resolved on the PATH Ray inherits from here.
  export PATH="$repo/.venv/bin:$PATH"
elif command -v ray >/dev/null 2>&1; then
  RAY="$(command -v ray)"
  ray_hint="ray"
else
  echo "error: no Ray CLI found (.venv/bin/ray or ray on PATH); install the project first" >&2
  exit 1
fi

# Project home as an absolute path (a relative MEMO_HOME is taken relative to the current dir).
MEMO_HOME="${MEMO_HOME:-$repo/.memo}"
mkdir -p "$MEMO_HOME"
MEMO_HOME="$(cd "$MEMO_HOME" && pwd)"
export MEMO_HOME

# Token authentication. Ray reads the token from, in order: $RAY_AUTH_TOKEN,
# the file named by $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token.
export RAY_AUTH_MODE=token
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
  token_src="the RAY_AUTH_TOKEN environment variable"
elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    echo "error: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty" >&2
    exit 1
  fi
  token_src="$RAY_AUTH_TOKEN_PATH"
else
  token_src="$HOME/.ray/auth_token"
  if [[ ! -s "$token_src" ]]; then
    # Writes a new token to ~/.ray/auth_token; its stdout (the token) is not echoed.
    "$RAY" get-auth-token --generate >/dev/null
  fi
fi

if command -v nproc >/dev/null 2>&1; then
  ncpu="$(nproc)"
else
  ncpu="$(getconf _NPROCESSORS_ONLN)"
fi

gpu_args=()
if [[ -n "${RAY_NUM_GPUS:-}" ]]; then
  gpu_args=(--num-gpus "$RAY_NUM_GPUS")
fi

"$RAY" start --head \
  --node-ip-address 127.0.0.1 \
  --port 6379 \
  --dashboard-host 127.0.0.1 \
  --dashboard-port 8265 \
  --num-cpus "${RAY_NUM_CPUS:-$ncpu}" \
  ${gpu_args[@]+"${gpu_args[@]}"} \
  "$@"

cat <<MSG

Ray head is up; dashboard and jobs API on http://127.0.0.1:8265, token auth on.
(Ray replaces --node-ip-address 127.0.0.1 with this host's IP, and GCS port 6379 listens on all
interfaces; token auth guards it, but firewall it if this host is reachable from outside.)
MEMO_HOME=$MEMO_HOME
MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-<unset: the platform default applies>}
Auth token source: $token_src

Submit jobs from another shell on this machine:

  cd $repo
  export RAY_ADDRESS=http://127.0.0.1:8265
  export RAY_AUTH_MODE=token
MSG
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
  echo '  export RAY_AUTH_TOKEN=...        # the same token this head was started with'
elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  echo "  export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
else
  echo '  # the token is read from ~/.ray/auth_token (same user); other users: export RAY_AUTH_TOKEN=...'
fi
cat <<MSG
  $ray_hint job submit --working-dir . -- python jobs/train.py --domain demo --corpus examples/demo/corpus.jsonl

Stop the head with: cluster/stop_head.sh
MSG
