#!/usr/bin/env bash
# Install the peers Ketch is compared with, each in its own virtual environment:
#   perf/peers/.venv-ray       ray[serve] + scikit-learn + numpy
#   perf/peers/.venv-mlserver  mlserver + mlserver-sklearn + scikit-learn + joblib (uvloop<0.22)
# Run on request only (not in CI), then: python -m perf.peers.compare
# Options: --only ray|mlserver   PYTHON=python3.11 perf/peers/setup.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"
only="${2:-}"
[[ "${1:-}" == "--only" ]] || only=""

available() {  # available PACKAGE: is it on the index this machine reaches?
  local dir
  dir="$(mktemp -d)"
  if "$py" -m pip download --quiet --no-deps --dest "$dir" "$1" >/dev/null 2>&1; then
    echo "  found $(ls "$dir")"
    rm -rf "$dir"
  else
    rm -rf "$dir"
    echo "  $1 is not available from the package index here" >&2
    return 1
  fi
}

install() {  # install NAME PACKAGE...
  local name="$1"
  shift
  local venv="$here/.venv-$name"
  echo "== $name: $*"
  for pkg in "$@"; do available "$pkg" || { echo "== $name: skipped"; return 1; }; done
  [[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$@"
  "$venv/bin/python" -m pip freeze | grep -i -E '^(ray|mlserver|mlserver-sklearn|scikit-learn|numpy|joblib|uvicorn|uvloop|fastapi)==' | sed 's/^/  /'
}

status=0
if [[ -z "$only" || "$only" == ray ]]; then
  install ray 'ray[serve]' scikit-learn numpy || status=1
fi
if [[ -z "$only" || "$only" == mlserver ]]; then
  # uvloop 0.22+ raises in asyncio.get_event_loop() without a running loop, which kills
  # MLServer 1.7's parallel inference workers at start ("WorkerStop ... exit code 256")
  install mlserver mlserver mlserver-sklearn scikit-learn joblib 'uvloop<0.22' || status=1
fi
exit $status
