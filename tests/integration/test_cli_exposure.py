"""``ketch broker start`` and ``ketch gateway`` never expose an unauthenticated socket by accident.

A ZMQ socket other machines can reach needs CurveZMQ, an HTTP one bearer tokens, and with
Curve on the gateway needs tokens too (it would otherwise be a way around Curve), unless
``--insecure`` says so. The refusals happen before anything binds; every bind these tests
could reach is guarded so that a regression fails here instead of listening on the network.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import zmq
from click.testing import CliRunner
from ketch.cli import main
from ketch.local import free_port, wait_for

pytestmark = pytest.mark.timeout(120)

EXPOSED = ["tcp://*:0", "tcp://0.0.0.0:0", "tcp://[::]:0", "tcp://eth0:0", "tcp://example.com:0"]
EXPOSED += ["tcp://10.1.2.3:0", "pgm://eth0;239.192.1.1:5555"]
LOCAL = ["tcp://127.0.0.1:0", "tcp://127.8.9.1:0", "tcp://[::1]:0", "tcp://localhost:0", "tcp://lo:0"]
LOCAL += ["ipc:///tmp/ketch-test.sock", "inproc://ketch"]


@pytest.fixture
def no_network_binds(monkeypatch):
    """Fail any bind to an address other than loopback in this process (checked without the
    code under test, so that it holds on any version of it)."""
    real_bind = zmq.Socket.bind

    def zmq_bind(self, address):
        local = ("tcp://127.0.0.1:", "tcp://[::1]:", "ipc://", "inproc://")
        if not address.startswith(local):
            raise OSError(f"a test tried to bind {address}")
        return real_bind(self, address)

    real_socket_bind = socket.socket.bind

    def socket_bind(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise OSError(f"a test tried to bind {address}")
        return real_socket_bind(self, address)

    monkeypatch.setattr(zmq.Socket, "bind", zmq_bind)
    monkeypatch.setattr(socket.socket, "bind", socket_bind)


def test_which_addresses_count_as_exposed():
    from ketchd.config import exposed, is_loopback

    assert all(exposed(a) for a in EXPOSED)
    assert not any(exposed(a) for a in LOCAL)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("192.168.1.1")


@pytest.mark.parametrize("role", ["frontend", "backend", "admin"])
@pytest.mark.parametrize("address", ["tcp://*:0", "tcp://0.0.0.0:0", "tcp://[::]:0", "tcp://eth0:0"])
def test_broker_start_refuses_an_exposed_socket_without_curve(no_network_binds, tmp_path, role, address):
    others = {r: "tcp://127.0.0.1:0" for r in ("frontend", "backend", "admin") if r != role}
    args = ["broker", "start", "--no-http", "--state", str(tmp_path / "s.db"), f"--{role}", address]
    args += [f"--{r}={a}" for r, a in others.items()]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"--{role} {address}" in result.output and "--insecure" in result.output
    assert "CurveZMQ is off" in result.output


def test_insecure_and_curve_let_an_exposed_socket_through_the_check():
    from ketchd.__main__ import config_from_options
    from ketchd.__main__ import main as ketchd_main

    def params(*args: str) -> dict:
        return ketchd_main.make_context("ketchd", list(args)).params

    config, _ = config_from_options(**params("--frontend", "tcp://*:7001", "--insecure"))
    assert config.frontend == "tcp://*:7001"
    config, _ = config_from_options(
        **params("--backend", "tcp://0.0.0.0:7000", "--curve-secret", "x.key_secret")
    )
    assert config.curve_secret == "x.key_secret"
    config, _ = config_from_options(**params())  # the defaults are loopback
    assert config.admin.startswith("tcp://127.0.0.1")
    import click

    with pytest.raises(click.UsageError, match="--insecure"):
        config_from_options(**params("--admin", "tcp://*:7002"))


def test_ketchd_refuses_too(no_network_binds, tmp_path):
    from ketchd.__main__ import main as ketchd_main

    result = CliRunner().invoke(ketchd_main, ["--frontend", "tcp://*:0", "--state", str(tmp_path / "s.db")])
    assert result.exit_code == 2 and "--insecure" in result.output, result.output


def test_the_gateway_refuses_an_exposed_address_without_tokens(no_network_binds):
    result = CliRunner().invoke(main, ["gateway", "--listen", "0.0.0.0:0"], env={"KETCH_GATEWAY_TOKENS": ""})
    assert result.exit_code == 2 and "--insecure" in result.output and "tokens" in result.output, (
        result.output
    )
    result = CliRunner().invoke(
        main, ["broker", "start", "--http", "0.0.0.0:0"], env={"KETCH_GATEWAY_TOKENS": ""}
    )
    assert result.exit_code == 2 and "--http 0.0.0.0" in result.output, result.output


@pytest.fixture
def curve_keys(tmp_path):
    from ketch.curve import generate

    keys = tmp_path / "keys"
    _, secret = generate(str(keys), "broker")
    folders = {}
    for role in ("clients", "containers", "admins"):
        folders[role] = tmp_path / role
        folders[role].mkdir()
    return ["--curve-secret", str(secret)] + [f"--curve-{r}={d}" for r, d in folders.items()]


def test_with_curve_on_the_gateway_needs_tokens_or_insecure(no_network_binds, tmp_path, curve_keys):
    args = ["broker", "start", "--state", str(tmp_path / "s.db"), *curve_keys]
    args += [f"--{role}=tcp://127.0.0.1:0" for role in ("frontend", "backend", "admin")]
    result = CliRunner().invoke(main, [*args, "--http", "127.0.0.1:0"], env={"KETCH_GATEWAY_TOKENS": ""})
    assert result.exit_code == 2, result.output
    assert "CurveZMQ is on" in result.output and "--http-token-file" in result.output


def test_with_curve_on_a_token_file_starts_a_gateway_that_asks_for_them(tmp_path, curve_keys):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    port = free_port()
    ready = tmp_path / "ready.json"
    argv = [
        sys.executable,
        "-m",
        "ketch.cli",
        "broker",
        "start",
        "--state",
        str(tmp_path / "s.db"),
        *curve_keys,
    ]
    argv += [f"--{role}=tcp://127.0.0.1:*" for role in ("frontend", "backend", "admin")]
    argv += ["--ready-file", str(ready), "--http", f"127.0.0.1:{port}", "--http-token-file", str(tokens)]
    env = {k: v for k, v in os.environ.items() if k != "KETCH_GATEWAY_TOKENS"}
    with open(tmp_path / "broker.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    try:

        def answers(headers: dict) -> int | None:
            assert proc.poll() is None, (tmp_path / "broker.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v2", headers=headers, timeout=2).status_code
            except httpx.TransportError:
                return None

        wait_for(lambda: answers({}), 30, "the gateway started by the broker")
        assert answers({}) == 401
        assert answers({"authorization": "Bearer s3cret"}) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
