#!/usr/bin/env bash
# The registry of a cluster-launcher cluster: one MLflow server on the head node, started by
# gpu-cluster.yaml's head_start_ray_commands before `ray start --head`; every node's Ray processes get
# MLFLOW_TRACKING_URI=http://<head private IP>:5000 (the same arguments as cluster/kuberay/mlflow.yaml).
#
#   bash cluster/launcher/start_mlflow.sh        # prints the tracking URI once the server answers
#
# - The database is SQLite on the shared volume (MLFLOW_DB, default /mnt/memo/mlflow-server/mlflow.db),
#   so the registry outlives `ray down`; one server process is its only writer.
# - Artifacts (the memories' weights) go from each run straight to /mnt/memo/mlartifacts
#   (--no-serve-artifacts): every node mounts that volume, nothing streams through the server.
# - It listens on the head's private IP only (the cluster's security group lets the nodes in; nothing
#   outside reaches it), and MLflow 3's Host check accepts that address and loopback only.
# - Idempotent: `ray up` re-runs head commands; a server already answering is left as it is.
set -euo pipefail

host="${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}"
port="${MLFLOW_PORT:-5000}"
db="${MLFLOW_DB:-/mnt/memo/mlflow-server/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS:-/mnt/memo/mlartifacts}"
url="http://$host:$port"
dir="$(dirname "$db")"
mkdir -p "$dir" "$artifacts"

answers() {
  python - "$url" <<'PY'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

if answers; then
  echo "$url"
  exit 0
fi
if ! python - "$host" "$port" <<'PY'
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((sys.argv[1], int(sys.argv[2])))
    except OSError as e:
        print(f"error: cannot serve MLflow on {sys.argv[1]}:{sys.argv[2]} ({e.strerror}): another process holds "
              "the port; stop it or set MLFLOW_PORT (and the port in gpu-cluster.yaml's start commands)",
              file=sys.stderr)
        sys.exit(1)
PY
then
  exit 1
fi

# MLflow 3 otherwise starts a job runner and 4-5 Huey consumer processes (GenAI evaluation and scoring
# jobs) beside the server, unused here (the same setting as cluster/kuberay/mlflow.yaml).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
# Its own session (process group), so that stopping it stops uvicorn's worker too: kill -- -<pid>.
# --workers=1: uvicorn kills a worker that is not up within 5 s (measured on a busy 2-core box).
setsid nohup mlflow server --host "$host" --port "$port" --workers=1 \
  --backend-store-uri "sqlite:///$db" \
  --default-artifact-root "file://$artifacts" --no-serve-artifacts \
  --allowed-hosts "$host:$port,localhost:*,127.0.0.1:*" \
  >"$dir/server.log" 2>&1 </dev/null &
echo $! >"$dir/server.pid"

for _ in $(seq 1 240); do
  if answers; then
    echo "$url"
    exit 0
  fi
  if ! kill -0 "$(cat "$dir/server.pid")" 2>/dev/null; then
    echo "error: the MLflow server exited while starting; the end of $dir/server.log:" >&2
    tail -n 20 "$dir/server.log" >&2
    exit 1
  fi
  sleep 0.5
done
echo "error: the MLflow server did not answer $url/health within 120 s; see $dir/server.log" >&2
exit 1
