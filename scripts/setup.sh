#!/usr/bin/env bash
# Install what Ketch needs on a fresh Debian machine, idempotently.
#   scripts/setup.sh            Python package and its runtime deps in .venv
#   scripts/setup.sh --test     also test tools, a JDK with Maven, R with its packages, helm, and
#                               Chromium with chromium-driver (the status page's browser test),
#                               prometheus and promtool (the metrics tests) in .tools/prometheus,
#                               the kserve SDK (its clients against the gateway) in .tools/kserve
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

apt_install() {
  # install the named Debian packages that are missing
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

pip_editable() {
  # Ketch itself, editable (the tests run the work tree). Its two source roots (sdk/python,
  # broker) make setuptools print an information notice, "Editable installation. Please be
  # careful with folders ...", at every install: filtered by its exact opening, warnings
  # that say something is wrong still show.
  PYTHONWARNINGS="ignore:Editable installation:UserWarning" .venv/bin/python -m pip install -q -e "$1"
}

unpack_prometheus() {
  # Debian's prometheus package (2.42), unpacked and not installed: only its two binaries,
  # prometheus and promtool, in .tools/prometheus; no service is set up and no daemon starts
  local dest=.tools/prometheus tmp
  [ -x "$dest/prometheus" ] && [ -x "$dest/promtool" ] && return 0
  echo "unpacking prometheus and promtool into $dest"
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); then
    $SUDO apt-get update -qq
    (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1)
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  mkdir -p "$dest"
  cp "$tmp/root/usr/bin/prometheus" "$tmp/root/usr/bin/promtool" "$dest/"
  rm -rf "$tmp"
}

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "Ketch needs Python 3.11 or newer (found: $("$PY" --version 2>&1))" >&2
  exit 1
fi
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  apt_install python3-venv
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "$want_test" = 1 ]; then
  pip_editable '.[test]'
  # Clipper's own admin client, to test the gateway's Clipper management API with it. Its last
  # release pins cloudpickle 0.5.3, which fails at import on Python 3.8+: it is installed
  # without its pins, its other requirements (and a current cloudpickle) come with the test extra
  .venv/bin/python -c 'import clipper_admin' >/dev/null 2>&1 \
    || .venv/bin/python -m pip install -q --no-deps 'clipper-admin==0.4.1'
  command -v mvn >/dev/null && command -v javac >/dev/null || apt_install default-jdk-headless maven
  Rscript -e 'library(pbdZMQ); library(testthat); library(jsonlite); library(roxygen2)' >/dev/null 2>&1 \
    || apt_install r-base-core r-cran-pbdzmq r-cran-testthat r-cran-jsonlite r-cran-roxygen2
  # headless Chromium and its WebDriver for the gateway page's test (Debian's builds: no browser download)
  apt_install chromium chromium-driver
  # helm for the chart's checks: built once with `go install`, cached in ~/.cache/ketch-infra
  scripts/infra.sh tools
  unpack_prometheus
  # the kserve SDK's REST and gRPC clients, run against the gateway by the tests: in a venv of
  # their own (.tools/kserve), as kserve pins psutil<6 and brings its server's dependencies
  [ -x .tools/kserve/bin/python ] && .tools/kserve/bin/python -c 'import kserve' >/dev/null 2>&1 || {
    echo "installing the kserve SDK into .tools/kserve"
    "$PY" -m venv .tools/kserve
    .tools/kserve/bin/python -m pip install -q 'kserve==0.21.0'
  }
else
  pip_editable '.[sklearn,http]'
fi
