#!/usr/bin/env bash
# Install everything and run every test: lint, generated-code check, Java (JUnit via
# Maven), R (testthat) and Python (pytest, with the cross-language tests last; tests/deploy
# checks the Helm chart and the Dockerfiles offline). The container and cluster run is
# scripts/e2e-containers.sh (not part of CI: it needs ~30 minutes and root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export PATH="$PWD/.venv/bin:$PATH"
export KETCH_REQUIRE_POLYGLOT=1
export KETCH_REQUIRE_DEPLOY_TOOLS=1   # tests/deploy: helm (from setup.sh), kubernetes-validate, hadolint
export KETCH_REQUIRE_BROWSER=1        # tests/integration/test_page.py: chromium + chromium-driver (from setup.sh)
export KETCH_KSERVE_PYTHON="$PWD/.tools/kserve/bin/python"  # the kserve SDK's clients (from setup.sh)
export KETCH_REQUIRE_KSERVE=1
export GRPC_ENABLE_FORK_SUPPORT=false  # gRPC clients in processes that fork then exec (tests/conftest.py)
export KETCH_REQUIRE_PROMTOOL=1       # the metrics tests: prometheus + promtool (from setup.sh, in .tools/prometheus)

echo "== lint"
ruff check .
ruff format --check .

echo "== types (mypy strict on the wire package and the broker)"
mypy -p ketch.protocol -p ketchd

echo "== generated code and golden vectors"
python scripts/gen_schema.py --check
python schemas/make_vectors.py --check

echo "== schema evolution: append-only against the last released schema (docs/protocol.md)"
flatc --conform schemas/released/ketch-v1.fbs schemas/ketch.fbs

echo "== Java SDK (JUnit 5)"
mvn -B -ntp -f sdk/java/pom.xml package
echo "java tests passed"

echo "== R SDK (testthat)"
Rscript sdk/r/tests/run.R

echo "== R package (roxygen2 docs up to date, R CMD check)"
rtmp=$(mktemp -d)
trap 'rm -rf "$rtmp"' EXIT
cp -r sdk/r "$rtmp/ketch"
Rscript -e "roxygen2::roxygenise('$rtmp/ketch')" >/dev/null 2>&1
if ! diff -r sdk/r/man "$rtmp/ketch/man" || ! diff sdk/r/NAMESPACE "$rtmp/ketch/NAMESPACE"; then
  echo "sdk/r/man or NAMESPACE is stale: run Rscript -e 'roxygen2::roxygenise(\"sdk/r\")'" >&2
  exit 1
fi
(cd "$rtmp" && R CMD build ketch >/dev/null && R CMD check --no-manual --no-tests ketch_*.tar.gz >check.log 2>&1) \
  || { cat "$rtmp/check.log"; exit 1; }
grep -E "^Status: OK" "$rtmp/check.log" || { grep -E "WARNING|NOTE|ERROR" -A8 "$rtmp/check.log"; exit 1; }

echo "== Python and cross-language (pytest)"
python -m pytest -q tests "$@"
