#!/usr/bin/env bash
# Start or stop the test services (moto S3 + MLflow tracking server) once for a whole test run.
#
#   tests/services.sh start [ENV_FILE]   # default ENV_FILE: .seme-services.env (what .ci/run sources)
#   tests/services.sh stop  [ENV_FILE]
#
# `start` writes SEME_TEST_S3_ENDPOINT=... and SEME_TEST_MLFLOW_URI=... to ENV_FILE; export them
# (set -a; . ENV_FILE; set +a) and the pytest fixtures in tests/services.py reuse these servers
# instead of starting their own. `stop` stops both by the PIDs recorded in ENV_FILE and removes it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
action="${1:-}"
env_file="${2:-$root/.seme-services.env}"
case "$action" in
  start|stop) ;;
  *) echo "usage: $0 start|stop [ENV_FILE]" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$env_file")"
exec "$py" "$here/services.py" "$action" "$env_file"
