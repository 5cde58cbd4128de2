#!/usr/bin/env python3
"""Check Ketch's Dockerfiles for what docs/deploy.md promises of every image.

    python scripts/check_dockerfiles.py [--model] DOCKERFILE...

hadolint checks general practice; this checks the project's own rules, on the parse of
dockerfile-parse:

- images (docker/*/Dockerfile): multi-stage, the final stage copies from a build stage and
  starts FROM the debootstrap base (${BASE}), never a registry image; it runs as a numeric
  non-root USER, has a HEALTHCHECK, and LABELs with the Ketch and framework versions;
- every stage: apt-get install with --no-install-recommends and the package lists removed
  in the same RUN; pip install with --no-cache-dir;
- extra CA certificates (certs/, .ketch-build/) are copied into build stages only;
- --model (Dockerfiles of `ketch model build`): the final stage starts FROM a Ketch image
  and keeps its non-root user (no USER, or a non-root one), and labels the model.

Exit status 1 with one line per problem, 0 when every file passes.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from dataclasses import dataclass, field

from dockerfile_parse import DockerfileParser

REQUIRED_LABELS = (
    "org.opencontainers.image.version",
    "io.ketch.version",
    "io.ketch.framework",
    "io.ketch.framework.version",
)
MODEL_LABELS = ("io.ketch.model.name", "io.ketch.model.version")
CERT_SOURCES = re.compile(r"(^|\s)(certs/|\.ketch-build/)")


@dataclass
class Stage:
    base: str
    line: int
    instructions: list[dict] = field(default_factory=list)

    def of(self, name: str) -> list[dict]:
        return [i for i in self.instructions if i["instruction"] == name]


def stages(text: str) -> list[Stage]:
    parser = DockerfileParser(fileobj=io.StringIO(text))  # (a path would be written to)
    out: list[Stage] = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            out.append(Stage(ins["value"].split()[0], ins["startline"] + 1))
        elif out:
            out[-1].instructions.append(ins)
    return out


def _labels(stage: Stage) -> set[str]:
    keys: set[str] = set()
    for ins in stage.of("LABEL"):
        keys |= set(re.findall(r'([\w.\-]+)=(?:"[^"]*"|\S+)', ins["value"]))
    return keys


def _run_problems(stage: Stage) -> list[str]:
    problems = []
    for ins in stage.of("RUN"):
        cmd, line = ins["value"], ins["startline"] + 1
        if "apt-get install" in cmd:
            if "--no-install-recommends" not in cmd:
                problems.append(f"line {line}: apt-get install without --no-install-recommends")
            if "/var/lib/apt/lists" not in cmd:
                problems.append(f"line {line}: apt-get install leaves /var/lib/apt/lists in the layer")
        if re.search(r"\bpip3? install\b", cmd) and "--no-cache-dir" not in cmd:
            problems.append(f"line {line}: pip install without --no-cache-dir")
    return problems


def _user_problems(stage: Stage, required: bool) -> list[str]:
    users = stage.of("USER")
    if not users:
        return ["final stage has no USER: it would run as root"] if required else []
    user = users[-1]["value"].split(":")[0].strip()
    if user in ("0", "root"):
        return [f"line {users[-1]['startline'] + 1}: the final stage runs as root"]
    if required and not user.isdigit():
        return [f"line {users[-1]['startline'] + 1}: USER {user}: use a numeric uid (runAsNonRoot checks it)"]
    return []


def check(text: str, *, model: bool = False) -> list[str]:
    """The problems of one Dockerfile's text (empty when it passes)."""
    found = stages(text)
    if not found:
        return ["no FROM"]
    final, builds = found[-1], found[:-1]
    problems: list[str] = []
    for stage in found:
        problems += _run_problems(stage)
    for ins in final.of("COPY") + final.of("ADD"):
        if CERT_SOURCES.search(ins["value"]) and "--from=" not in ins["value"]:
            problems.append(f"line {ins['startline'] + 1}: extra CA certificates copied into the final image")
    for ins in final.of("ADD"):
        if re.search(r"https?://", ins["value"]):
            problems.append(f"line {ins['startline'] + 1}: ADD of a URL")
    if model:
        if not final.base.startswith(("ketch/", "${")) and "/ketch/" not in final.base:
            problems.append(f"line {final.line}: a model image starts FROM a Ketch image, not {final.base}")
        problems += _user_problems(final, required=False)
        missing = [k for k in MODEL_LABELS if k not in _labels(final)]
    else:
        if not builds:
            problems.append("not multi-stage: build in one stage, copy the result into the final one")
        elif not any("--from=" in i["value"] for i in final.of("COPY")):
            problems.append("the final stage copies nothing from a build stage")
        for stage in found:
            if stage.base != "${BASE}":
                problems.append(
                    f"line {stage.line}: FROM {stage.base}: start from the debootstrap base ${{BASE}}"
                )
        problems += _user_problems(final, required=True)
        checks = final.of("HEALTHCHECK")
        if not checks or checks[-1]["value"].strip().upper().startswith("NONE"):
            problems.append("final stage has no HEALTHCHECK")
        missing = [k for k in REQUIRED_LABELS if k not in _labels(final)]
    if missing:
        problems.append(f"final stage lacks the labels {', '.join(missing)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="store_true", help="the Dockerfiles are of `ketch model build`")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    bad = 0
    for path in args.files:
        with open(path, encoding="utf-8") as fh:
            problems = check(fh.read(), model=args.model)
        for p in problems:
            print(f"{path}: {p}")
        bad += bool(problems)
    print(f"{len(args.files) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
