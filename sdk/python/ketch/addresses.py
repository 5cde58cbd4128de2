"""The broker's three default addresses (docs/protocol.md section 1), in a module of their
own so that a process can name them without importing a client (ZeroMQ, numpy)."""

FRONTEND = "tcp://127.0.0.1:7001"  # clients
BACKEND = "tcp://127.0.0.1:7000"  # model replicas
ADMIN = "tcp://127.0.0.1:7002"  # the CLI and ketch.Admin
METRICS = "127.0.0.1:7003"  # the broker's own Prometheus /metrics (HTTP; HOST:PORT)
