"""Where events travel. Each backend is one module behind one interface; the bus picks one
from its URL. Today the in-process ``memory://`` backend is built into the bus, and the
``sqlite://`` storage layer exists (`sqlite_log`); the broker backends (sqlite, redis, nats,
amqp) are being built behind this module (see docs/design-backends.md)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

MEMORY = "memory"

# scheme -> (module the backend imports, the extra that installs it)
_EXTRAS: dict[str, tuple[str, str]] = {
    "redis": ("redis", "redis"),
    "nats": ("nats", "nats"),
    "amqp": ("aio_pika", "rabbitmq"),
}
# Broker schemes the project is building; named here so their URLs get an honest error.
PLANNED_SCHEMES = ("sqlite", "redis", "nats", "amqp")


@dataclass(frozen=True, slots=True)
class BusURL:
    """A parsed bus URL. `redacted` is safe to print: its password is replaced."""

    scheme: str
    redacted: str
    host: str | None
    port: int | None
    path: str
    username: str | None
    password: str | None


def _redact(parts: SplitResult) -> str:
    if parts.password is None:
        return parts.geturl()
    user = parts.username or ""
    where = parts.netloc.rsplit("@", 1)[-1]  # host[:port] as written, even if malformed
    return parts._replace(netloc=f"{user}:***@{where}").geturl()


def parse_url(url: str) -> BusURL:
    """Parse and check a bus URL; raise `ValueError` naming what is wrong (never its
    password)."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"bus URL must be a non-empty str such as 'memory://', got {url!r}")
    parts = urlsplit(url)
    if "://" not in url or not parts.scheme:
        raise ValueError(
            "malformed bus URL: expected scheme://..., e.g. 'memory://', "
            "'sqlite:///var/lib/app/bus.db' or 'nats://127.0.0.1:4222'"
        )
    redacted = _redact(parts)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bus URL {redacted!r} has an invalid port") from None
    return BusURL(
        scheme=parts.scheme.lower(),
        redacted=redacted,
        host=parts.hostname,
        port=port,
        path=parts.path,
        username=parts.username,
        password=parts.password,
    )


def require_extra(scheme: str) -> None:
    """Raise `ImportError` with the `pip install` to run when a backend's client is missing."""
    module, extra = _EXTRAS.get(scheme, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ImportError(
            f"the {scheme}:// backend needs the {module!r} client, which is not installed: "
            f"pip install 'eventwire[{extra}]'"
        )


def resolve_url(url: str) -> str:
    """Normalise and check a bus URL; raise `ValueError` naming what is wrong."""
    parsed = parse_url(url)
    if parsed.scheme == MEMORY:
        return "memory://"
    if parsed.scheme in PLANNED_SCHEMES:
        raise ValueError(
            f"the {parsed.scheme}:// backend is not available in this version of eventwire; "
            "use 'memory://' (the in-process default)"
        )
    raise ValueError(
        f"unknown bus URL scheme {parsed.scheme!r} in {parsed.redacted!r}; supported: 'memory://'"
    )
