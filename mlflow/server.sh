#!/usr/bin/env bash
# Start the project's MLflow tracking server: sqlite backend store, a local artifacts destination served through
# the server, bound to 127.0.0.1. Settings: mlflow/server.env (environment variables override them).
#   mlflow/server.sh                      # then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#   MLFLOW_PORT=5001 mlflow/server.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# shellcheck disable=SC1091
source mlflow/server.env
case "$MLFLOW_STORE" in /*) store="$MLFLOW_STORE" ;; *) store="$root/$MLFLOW_STORE" ;; esac
case "$MLFLOW_ARTIFACTS" in /*) artifacts="$MLFLOW_ARTIFACTS" ;; *) artifacts="$root/$MLFLOW_ARTIFACTS" ;; esac
mkdir -p "$(dirname "$store")" "$artifacts"
mlflow_bin="${MLFLOW_BIN:-$root/.venv/bin/mlflow}"
[ -x "$mlflow_bin" ] || mlflow_bin="$(command -v mlflow)"
echo "MLflow server: http://$MLFLOW_HOST:$MLFLOW_PORT  store sqlite:///$store  artifacts $artifacts" >&2
exec "$mlflow_bin" server --backend-store-uri "sqlite:///$store" --artifacts-destination "$artifacts" \
    --serve-artifacts --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS"
