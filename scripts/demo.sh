#!/usr/bin/env bash
# Install Ketch into .venv and run `ketch demo`: a broker, a scikit-learn model with
# replicas, real queries and a latency summary. Extra arguments go to `ketch demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ketch demo "$@"
