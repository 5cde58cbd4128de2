"""ketchd: the Ketch broker.

One process, one thread, one poll loop (``Broker.run``) owning every piece of routing
state. See docs/architecture.md and docs/protocol.md.

``Broker`` is loaded on first use (PEP 562), so that ``ketch``'s CLI can read the broker's
options (``ketchd.__main__``) without loading the broker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ketchd.config import BrokerConfig

if TYPE_CHECKING:
    from ketchd.broker import Broker

__all__ = ["Broker", "BrokerConfig"]


def __getattr__(name: str) -> Any:
    if name == "Broker":
        from ketchd.broker import Broker

        return Broker
    raise AttributeError(f"module 'ketchd' has no attribute {name!r}")
