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

echo "== lint"
ruff check .
ruff format --check .

echo "== generated code and golden vectors"
python scripts/gen_schema.py --check
python schemas/make_vectors.py --check

echo "== Java SDK (JUnit 5)"
mvn -B -ntp -f sdk/java/pom.xml package
echo "java tests passed"

echo "== R SDK (testthat)"
Rscript sdk/r/tests/run.R

echo "== Python and cross-language (pytest)"
python -m pytest -q tests "$@"
