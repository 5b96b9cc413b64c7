"""Where events travel. Each backend is one module behind one interface; the bus picks one
from its URL. Today the in-process ``memory://`` backend is built into the bus; the broker
backends (sqlite, redis, nats, amqp) are the next step of the roadmap."""

from __future__ import annotations

from urllib.parse import urlsplit

MEMORY = "memory"
# Broker schemes the project is building; named here so their URLs get an honest error.
PLANNED_SCHEMES = ("sqlite", "redis", "nats", "amqp")


def resolve_url(url: str) -> str:
    """Normalise and check a bus URL; raise `ValueError` naming what is wrong."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"bus URL must be a non-empty str such as 'memory://', got {url!r}")
    parts = urlsplit(url)
    if "://" not in url or not parts.scheme:
        raise ValueError(
            f"malformed bus URL {url!r}: expected scheme://..., e.g. 'memory://' or "
            "'nats://127.0.0.1:4222'"
        )
    scheme = parts.scheme.lower()
    if scheme == MEMORY:
        return "memory://"
    if scheme in PLANNED_SCHEMES:
        raise ValueError(
            f"the {scheme}:// backend is not available in this version of eventwire; "
            "use 'memory://' (the in-process default)"
        )
    raise ValueError(f"unknown bus URL scheme {parts.scheme!r} in {url!r}; supported: 'memory://'")
