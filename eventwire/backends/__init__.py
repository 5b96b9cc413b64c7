"""Where events travel. Each backend is one module behind one interface (`base.Backend`),
the in-process ``memory://`` bus included; the bus picks one by its URL's scheme.

Schemes are looked up in a registry: eventwire's own backends, then those other packages
declare in the ``eventwire.backends`` entry-point group, as ``scheme = "module:Class"``::

    [project.entry-points."eventwire.backends"]
    kafka = "eventwire_kafka:KafkaBackend"

and those registered at run time with `register_backend`.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from eventwire.backends.url import BusURL, URLOptions, parse_url

if TYPE_CHECKING:
    from eventwire.backends.base import Backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "MEMORY",
    "SCHEMES",
    "BusURL",
    "backend_class",
    "open_backend",
    "parse_url",
    "register_backend",
    "require_extra",
    "resolve_url",
]

MEMORY = "memory"
ENTRY_POINT_GROUP = "eventwire.backends"

# scheme -> "module:Class" of eventwire's own backends.
_BUILT_IN: dict[str, str] = {
    "memory": "eventwire.backends.memory:MemoryBackend",
    "sqlite": "eventwire.backends.sqlite:SqliteBackend",
    "redis": "eventwire.backends.redis:RedisBackend",
    "nats": "eventwire.backends.nats:NatsBackend",
    "amqp": "eventwire.backends.amqp:AmqpBackend",
}
# scheme -> (module the backend imports, the extra that installs it)
_EXTRAS: dict[str, tuple[str, str]] = {
    "redis": ("redis", "redis"),
    "nats": ("nats", "nats"),
    "amqp": ("aio_pika", "rabbitmq"),
}
SCHEMES = tuple(_BUILT_IN)

# Backends registered by `register_backend`: scheme -> class or "module:Class".
_registered: dict[str, type[Backend] | str] = {}


def register_backend(scheme: str, backend: type[Backend] | str) -> None:
    """Make ``scheme://`` URLs open `backend` (a `Backend` subclass, or ``"module:Class"``
    imported on first use). Overrides a built-in or entry-point backend of that scheme."""
    if not scheme.isidentifier() or scheme.lower() != scheme:
        raise ValueError(f"a backend scheme is a lowercase identifier, got {scheme!r}")
    _registered[scheme] = backend


def _declared() -> dict[str, str]:
    """Backends declared by installed packages in the entry-point group."""
    return {point.name: point.value for point in entry_points(group=ENTRY_POINT_GROUP)}


def _target(scheme: str) -> type[Backend] | str | None:
    if scheme in _registered:
        return _registered[scheme]
    if scheme in _BUILT_IN:
        return _BUILT_IN[scheme]
    return _declared().get(scheme)


def known_schemes() -> list[str]:
    """Every scheme a URL may use here: built in, declared by packages, registered."""
    return list(dict.fromkeys([*_BUILT_IN, *_declared(), *_registered]))


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
    if parsed.scheme == MEMORY and _target(MEMORY) == _BUILT_IN[MEMORY]:
        URLOptions(parsed, ())  # the in-process bus takes no options but the namespace
        return "memory://"
    if _target(parsed.scheme) is None:
        raise ValueError(
            f"unknown bus URL scheme {parsed.scheme!r} in {parsed.redacted!r}; supported: "
            + ", ".join(f"'{scheme}://'" for scheme in known_schemes())
        )
    require_extra(parsed.scheme)
    return url


def backend_class(scheme: str) -> type[Backend]:
    """The backend class that opens ``scheme://`` URLs."""
    from eventwire.backends.base import Backend

    target = _target(scheme)
    if target is None:
        raise ValueError(f"no backend is registered for the {scheme!r} scheme")
    if isinstance(target, str):
        module_name, _, class_name = target.partition(":")
        found = getattr(importlib.import_module(module_name), class_name, None)
        if not (isinstance(found, type) and issubclass(found, Backend)):
            raise TypeError(
                f"the backend of {scheme}:// ({target}) is not an eventwire Backend subclass"
            )
        target = found
    return target


def open_backend(url: str) -> Backend:
    """The backend for `url`, not yet connected."""
    parsed = parse_url(resolve_url(url))
    return backend_class(parsed.scheme)(parsed)
