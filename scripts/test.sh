#!/usr/bin/env bash
# Install everything and run every test: lint, generated-code check, Java (JUnit via
# Maven), R (testthat) and Python (pytest, with the cross-language tests last).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export PATH="$PWD/.venv/bin:$PATH"
export KETCH_REQUIRE_POLYGLOT=1

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

echo "== Python and cross-language (pytest)"
python -m pytest -q tests "$@"
