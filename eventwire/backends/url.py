"""Bus URLs: ``scheme://[user:password@]host[:port]/path?option=value``, parsed and checked
once, with a redacted form that is safe to print."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import SplitResult, parse_qsl, urlsplit


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
