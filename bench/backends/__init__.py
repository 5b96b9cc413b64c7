"""The broker benchmark's implementations: the same workload on eventwire, on each broker's
own Python client and on FastStream. `bench/bench_backends.py` runs them, each in its own
subprocess; `workload.py` holds what they share (payload, pipelined publishing, timing)."""

from __future__ import annotations

BACKENDS = ("sqlite", "redis", "nats", "amqp")
IMPLS = ("eventwire", "raw", "faststream")
# Module of this package that implements each implementation.
MODULES = {"eventwire": "impl_eventwire", "raw": "impl_raw", "faststream": "impl_faststream"}
# (backend, implementation) pairs that do not exist, and why.
NOT_APPLICABLE = {("sqlite", "faststream"): "n/a: FastStream has no SQLite broker"}
