"""``KetchContainerManager``: points Clipper's ``clipper_admin`` at a Ketch gateway.

``clipper_admin.ClipperConnection(cm)`` asks its container manager where Clipper's query and
management frontends are (``get_query_addr``, ``get_admin_addr``) and sends every call there.
A Ketch gateway serves both: Clipper's query routes (``/{app}/predict``) and its management
routes (``/admin/...``, admin tokens only). So a Clipper user's admin code runs unchanged:

    from clipper_admin import ClipperConnection
    from ketch.clipper_compat import KetchContainerManager

    conn = ClipperConnection(KetchContainerManager("http://127.0.0.1:8080", admin_token="s3cret"))
    conn.connect()
    conn.register_application("iris", "doubles", "-1", 100000)
    conn.link_model_to_app("iris", "iris")

The token travels in the addresses (``admin:<token>@host:port``): ``requests``, which
clipper_admin uses, sends it as HTTP Basic, which the gateway takes as a bearer token.
clipper_admin logs the query address at ``connect()`` (INFO), token and all; to keep the
token out of logs, pass ``token_in_address=False`` and give ``requests`` the token in a
netrc file instead (``~/.netrc`` or ``$NETRC``: ``machine HOST login admin password TOKEN``).

What this manager cannot do is what Ketch does not do: start, scale or stop containers
(``start_clipper``, ``deploy_model``, ``set_num_replicas``, ``stop_*``). Those raise
``NotImplementedError`` with what to do instead: Ketch replicas are started by ``ketch
serve`` / ``ketch model serve`` (or Ketch's images and Kubernetes manifests) and connect to
the broker themselves. clipper_admin does not need to be installed to import this module.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

_NO_CONTAINERS = (
    "Ketch starts no containers through clipper_admin: start replicas with `ketch serve` / "
    "`ketch model serve` (or Ketch's images), and they connect to the broker themselves"
)


class KetchContainerManager:
    """A clipper_admin container manager for a running Ketch gateway at ``url``."""

    cluster_name = "ketch"

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        *,
        admin_token: str | None = None,
        token_in_address: bool = True,
        timeout_s: float = 10,
    ) -> None:
        parsed = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parsed.scheme != "http" or not parsed.hostname or parsed.path not in ("", "/"):
            # clipper_admin builds "http://{addr}/..." itself: an address, not a URL with a path
            raise ValueError(f"url {url!r}: give the gateway as http://host:port")
        self.netloc = parsed.netloc
        self.admin_token = admin_token
        self.token_in_address = token_in_address
        self.timeout_s = timeout_s
        self.cluster_identifier = f"ketch@{self.netloc}"
        self.logger = None

    # ------------------------------------------------------------ where Clipper's frontends are

    def _addr(self) -> str:
        if not self.admin_token or not self.token_in_address:
            return self.netloc
        return f"admin:{urllib.parse.quote(self.admin_token, safe='')}@{self.netloc}"

    def get_admin_addr(self) -> str:
        return self._addr()

    def get_query_addr(self) -> str:
        return self._addr()

    def get_metric_addr(self) -> str:
        return self.netloc  # the gateway's Prometheus /metrics (Ketch's series, not Clipper's)

    def connect(self) -> None:
        """Check that the gateway answers ``/admin/ping`` with this token."""
        self._call("GET", "/admin/ping")

    def _call(self, method: str, path: str, doc: Any = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.admin_token:
            basic = base64.b64encode(f"admin:{self.admin_token}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        body = None if doc is None else json.dumps(doc).encode()
        req = urllib.request.Request(f"http://{self.netloc}{path}", body, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            raise ConnectionError(
                f"the Ketch gateway at {self.netloc} answered {path} with {exc.code}: "
                f"{exc.read().decode(errors='replace')[:300]}"
            ) from None
        except OSError as exc:
            raise ConnectionError(f"no Ketch gateway answers at {self.netloc}: {exc}") from None
        try:
            return json.loads(text)
        except ValueError:
            return text

    # ------------------------------------------------------------ replicas

    def get_num_replicas(self, name: str, version: str) -> int:
        """Live Ketch replicas of ``name`` at ``version``."""
        containers = self._call("POST", "/admin/get_all_containers", {"verbose": True})
        return sum(1 for c in containers if c["model_name"] == name and c["model_version"] == str(version))

    # ------------------------------------------------------------ what Ketch does not do

    def start_clipper(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "start Ketch with `ketch broker start` (it starts the gateway), then ClipperConnection.connect()"
        )

    def deploy_model(
        self, name: str, version: str, input_type: str, image: str, num_replicas: int = 1
    ) -> None:
        raise NotImplementedError(_NO_CONTAINERS)

    def set_num_replicas(
        self, name: str, version: str, input_type: str, image: str, num_replicas: int
    ) -> None:
        raise NotImplementedError(_NO_CONTAINERS)

    def get_logs(self, logging_dir: str) -> list[str]:
        raise NotImplementedError(
            "Ketch's logs are the broker's, the gateway's and each replica's own output"
        )

    def stop_models(self, models: dict[str, list[str]]) -> None:
        raise NotImplementedError(_NO_CONTAINERS + "; stop a replica with Ctrl-C or `ketch model drain`")

    def stop_all_model_containers(self) -> None:
        raise NotImplementedError(_NO_CONTAINERS + "; stop a replica with Ctrl-C or `ketch model drain`")

    def stop_all(self, graceful: bool = True) -> None:
        raise NotImplementedError("stop Ketch with `ketch broker stop`")
