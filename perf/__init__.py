"""Ketch benchmarks: each module runs on its own, e.g. ``python -m perf.cache``."""
