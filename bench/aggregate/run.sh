#!/usr/bin/env bash
# FedAvg benchmark: flwr's aggregate() vs lepton_tasks.federation.aggregate.fedavg (see bench/README.md).
# Usage: bench/aggregate/run.sh [bench.py options]   e.g. --partners 20 --params 10000000 --json out.json
# Creates bench/.venv-flwr (gitignored) from requirements.txt when missing or when requirements.txt changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/bench/.venv-flwr"
REQ="$ROOT/bench/aggregate/requirements.txt"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REQ" | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "# creating $VENV from $REQ" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -r "$REQ"
  echo "$WANT" > "$STAMP"
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" "$ROOT/bench/aggregate/bench.py" "$@"
