"""Where events travel. Each backend is one module behind one interface (`base.Backend`);
the bus picks one from its URL. ``memory://`` (the default) needs none: the bus delivers
in-process itself."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, parse_qsl, urlsplit

if TYPE_CHECKING:
    from eventwire.backends.base import Backend

MEMORY = "memory"

# scheme -> (module the backend imports, the extra that installs it)
_EXTRAS: dict[str, tuple[str, str]] = {
    "redis": ("redis", "redis"),
    "nats": ("nats", "nats"),
    "amqp": ("aio_pika", "rabbitmq"),
}
# scheme -> module of eventwire.backends that implements it
_MODULES: dict[str, str] = {
    "sqlite": "sqlite",
    "redis": "redis",
    "nats": "nats",
    "amqp": "amqp",
}
SCHEMES = ("memory", *_MODULES)


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
    query: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def _redact(parts: SplitResult, url: str) -> str:
    if parts.password is None:
        return url
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
    redacted = _redact(parts, url)
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
        query=MappingProxyType(dict(parse_qsl(parts.query))),
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
    """Check a bus URL (and that its backend's client is installed); return it normalised.
    Raises `ValueError` naming what is wrong, `ImportError` naming the extra to install."""
    parsed = parse_url(url)
    if parsed.scheme == MEMORY:
        return "memory://"
    if parsed.scheme not in _MODULES:
        raise ValueError(
            f"unknown bus URL scheme {parsed.scheme!r} in {parsed.redacted!r}; supported: "
            + ", ".join(f"'{scheme}://'" for scheme in SCHEMES)
        )
    require_extra(parsed.scheme)
    return url


def open_backend(url: str) -> Backend | None:
    """The backend for `url` (not yet connected), or None for the in-process bus."""
    parsed = parse_url(resolve_url(url))
    if parsed.scheme == MEMORY:
        return None
    from importlib import import_module

    from eventwire.backends.base import Backend

    module = import_module(f"eventwire.backends.{_MODULES[parsed.scheme]}")
    backend_class = next(
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Backend)
        and value is not Backend
        and getattr(value, "scheme", None) == parsed.scheme
    )
    backend: Backend = backend_class(parsed)
    return backend
