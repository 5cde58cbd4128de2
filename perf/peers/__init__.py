"""Ketch against the systems users would pick instead: ``perf/peers/setup.sh``, then
``python -m perf.peers.compare`` (see perf/README.md)."""
