"""The Java and R SDKs as packages a new user depends on, following the SDK READMEs alone.

Java: the jars ``mvn package`` builds (thin, -sources, -javadoc, the shaded -all) are what
a release publishes; a user's own Maven project depends on ``io.ketch:ketch-sdk:0.1.0``
from a repository (here a file repository in the test's directory, so the user's
``~/.m2`` gets no Ketch of this checkout), builds, and queries a real broker with
``io.ketch.Client``. R: ``R CMD INSTALL --library=DIR sdk/r``, then a user's script with
``library(ketch)`` serves a model to a real broker.

Without the toolchains these tests skip, unless KETCH_REQUIRE_POLYGLOT=1 (scripts/test.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import ketch
import pytest
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(400)

ROOT = Path(__file__).resolve().parents[2]
JAVA = ROOT / "sdk" / "java"
TARGET = JAVA / "target"
VERSION = "0.1.0"
REQUIRED = os.environ.get("KETCH_REQUIRE_POLYGLOT") == "1"


def _need(ok: bool, what: str) -> None:
    if not ok:
        if REQUIRED:
            pytest.fail(f"{what} is missing (KETCH_REQUIRE_POLYGLOT=1)")
        pytest.skip(f"{what} is missing")


def _jar(classifier: str = "") -> Path:
    path = TARGET / f"ketch-sdk-{VERSION}{'-' + classifier if classifier else ''}.jar"
    _need(path.exists(), f"{path.relative_to(ROOT)} (mvn -f sdk/java/pom.xml package)")
    return path


def _names(jar: Path) -> list[str]:
    with zipfile.ZipFile(jar) as z:
        return z.namelist()


def test_the_java_jars_are_what_a_release_publishes():
    thin = [n for n in _names(_jar()) if n.endswith(".class")]
    assert thin and all(n.startswith(("io/ketch/", "ketch/wire/")) for n in thin), [
        n for n in thin if not n.startswith(("io/ketch/", "ketch/wire/"))
    ]
    assert "io/ketch/Client.class" in thin and "io/ketch/Container.class" in thin
    sources = _names(_jar("sources"))
    assert "io/ketch/Client.java" in sources and "ketch/wire/Hello.java" in sources
    javadoc = _names(_jar("javadoc"))
    assert "io/ketch/Client.html" in javadoc and "index.html" in javadoc
    # the shaded jar: every dependency relocated under io.ketch.shaded, none left where a
    # user's own ZeroMQ, Gson or FlatBuffers lives
    shaded = [n for n in _names(_jar("all")) if n.endswith(".class")]
    assert all(n.startswith(("io/ketch/", "ketch/wire/")) for n in shaded), [
        n for n in shaded if not n.startswith(("io/ketch/", "ketch/wire/"))
    ][:10]
    for dep in ("zeromq", "gson", "flatbuffers"):
        assert any(n.startswith(f"io/ketch/shaded/{dep}/") for n in shaded), dep
    pom = (JAVA / "pom.xml").read_text("utf-8")
    for element in ("licenses", "developers", "scm", "url", "description", "name"):
        assert re.search(f"<{element}>.+?</{element}>", pom, re.S), element


USER_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>com.example</groupId>
  <artifactId>uses-ketch</artifactId>
  <version>1.0</version>
  <properties>
    <maven.compiler.release>17</maven.compiler.release>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
  </properties>
  <dependencies>
    <dependency>
      <groupId>io.ketch</groupId>
      <artifactId>ketch-sdk</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-compiler-plugin</artifactId>
        <version>3.14.0</version>
      </plugin>
    </plugins>
  </build>
</project>
"""

USER_MAIN = """package com.example;

import io.ketch.Client;
import io.ketch.Prediction;
import io.ketch.RequestException;
import io.ketch.Value;
import java.time.Duration;

public final class Main {
    public static void main(String[] args) {
        try (Client client = Client.builder(args[0]).timeout(Duration.ofSeconds(10)).build()) {
            Prediction p = client.predict(args[1], Value.doubles(new double[] {1.5, 2.0, 4.0}));
            System.out.println("output " + p.output().asDoubles()[0] + " from " + p.model());
            try {
                client.predict("no-such-app", Value.doubles(new double[] {1.0}));
            } catch (RequestException.UnknownApp e) {
                System.out.println("unknown app: " + e.getClass().getSimpleName());
            }
        }
    }
}
"""


# A local repository of the test's own, so that neither an io.ketch:ketch-sdk the user
# installed earlier is used nor this test's leaves anything behind in ~/.m2. The release
# (a file repository the test deploys to) comes first; the user's own local repository
# serves as a read-only file repository ahead of Maven Central, so the plugins and
# libraries Maven has already fetched are not fetched again.
SETTINGS = """<settings>
  <localRepository>{local}</localRepository>
  <profiles>
    <profile>
      <id>user-cache</id>
      <repositories>
        <repository><id>ketch-release</id><url>{release}</url></repository>
        <repository><id>user-cache</id><url>{cache}</url></repository>
      </repositories>
      <pluginRepositories>
        <pluginRepository><id>user-cache</id><url>{cache}</url></pluginRepository>
      </pluginRepositories>
    </profile>
  </profiles>
  <activeProfiles><activeProfile>user-cache</activeProfile></activeProfiles>
</settings>
"""


def _mvn(*args: str, cwd: Path, settings: Path) -> str:
    argv = ["mvn", "-B", "-ntp", "-s", str(settings), *args]
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return done.stdout


def test_a_new_java_project_builds_against_the_sdk_and_queries(thread_broker, replica_threads, tmp_path):
    _need(shutil.which("mvn") is not None and shutil.which("java") is not None, "mvn and java")
    from ketch.examples.basic import total

    settings = tmp_path / "settings.xml"
    cache = Path.home() / ".m2" / "repository"
    repo = tmp_path / "repo"
    text = SETTINGS.format(local=tmp_path / "m2", release=repo.as_uri(), cache=cache.as_uri())
    settings.write_text(text, "utf-8")
    _mvn(
        "deploy:deploy-file", f"-Durl={repo.as_uri()}", f"-Dfile={_jar()}", f"-DpomFile={JAVA / 'pom.xml'}",
        f"-Dsources={_jar('sources')}", f"-Djavadoc={_jar('javadoc')}",
        cwd=tmp_path, settings=settings,
    )  # fmt: skip
    project = tmp_path / "uses-ketch"
    (project / "src/main/java/com/example").mkdir(parents=True)
    (project / "pom.xml").write_text(USER_POM.format(version=VERSION), "utf-8")
    (project / "src/main/java/com/example/Main.java").write_text(USER_MAIN, "utf-8")
    _mvn("-q", "package", cwd=project, settings=settings)
    _mvn("-q", "dependency:build-classpath", "-Dmdep.outputFile=cp.txt", cwd=project, settings=settings)
    classpath = (project / "cp.txt").read_text().strip()
    assert f"ketch-sdk-{VERSION}.jar" in classpath and "jeromq" in classpath
    # the SDK the project built against is this checkout's, from the release repository
    got = next(Path(p) for p in classpath.split(os.pathsep) if p.endswith(f"ketch-sdk-{VERSION}.jar"))
    assert got.is_relative_to(tmp_path / "m2") and got.read_bytes() == _jar().read_bytes()

    replica_threads(total, backend=thread_broker.backend, name="py-sum")
    with ketch.Admin(thread_broker.admin) as admin:
        admin.create_app("sum", input_type="float64", input_shape=[-1], slo_ms=5000, models=["py-sum"])
        wait_for(lambda: admin.replicas("py-sum"), 30, "the replica")
    done = subprocess.run(
        ["java", "-cp", f"{project / 'target' / 'classes'}{os.pathsep}{classpath}", "com.example.Main",
         thread_broker.frontend, "sum"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["output 7.5 from py-sum", "unknown app: UnknownApp"], done.stdout


USER_SCRIPT = """
.libPaths(c(commandArgs(TRUE)[1], .libPaths()))
library(ketch)
ketch_serve(function(inputs) lapply(inputs, function(x) sum(x) * 2),
            name = "r-user", version = "1", input_type = "float64", input_shape = -1,
            broker = commandArgs(TRUE)[2])
"""


def test_a_new_r_user_installs_the_package_and_serves_a_model(broker_process, tmp_path):
    _need(shutil.which("R") is not None and shutil.which("Rscript") is not None, "R and Rscript")
    lib = tmp_path / "lib"
    lib.mkdir()
    # as sdk/r/README.md says: a library of the user's own; a copy, so the checkout stays clean
    shutil.copytree(ROOT / "sdk" / "r", tmp_path / "ketch")
    done = subprocess.run(
        ["R", "CMD", "INSTALL", f"--library={lib}", str(tmp_path / "ketch")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (lib / "ketch" / "DESCRIPTION").exists()
    script = tmp_path / "serve.R"
    script.write_text(USER_SCRIPT, "utf-8")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        # run outside the checkout, so nothing but the installed package can be found
        proc = subprocess.Popen(
            ["Rscript", str(script), str(lib), broker_process.backend], stdout=log, stderr=log, cwd=tmp_path
        )
    try:
        with ketch.Admin(broker_process.admin) as admin:
            admin.create_app(
                "r-user", input_type="float64", input_shape=[-1], slo_ms=10_000, models=["r-user"]
            )
            wait_for(lambda: admin.replicas("r-user"), 60, "the R replica")
        with ketch.Client(broker_process.frontend) as client:
            preds = client.predict_many("r-user", [[1.0, 2.0], [3.5], [-1.0, 1.0, 4.0]], timeout_ms=10_000)
        assert [float(p.output) for p in preds] == [6.0, 7.0, 8.0]
        assert all(p.model == "r-user" and not p.default for p in preds)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log_path.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "drained, goodbye" in log_path.read_text(errors="replace")
