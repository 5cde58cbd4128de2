"""ketchd: the Ketch broker.

One process, one thread, one poll loop (``Broker.run``) owning every piece of routing
state. See docs/architecture.md and docs/protocol.md.
"""

from ketchd.broker import Broker
from ketchd.config import BrokerConfig

__all__ = ["Broker", "BrokerConfig"]
