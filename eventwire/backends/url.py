"""Bus URLs: ``scheme://[user:password@]host[:port]/path?option=value``, parsed and checked
once, with a redacted form that is safe to print."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

# Options every scheme takes (read by `eventwire.backends.base.namespace_of`).
COMMON_OPTIONS = ("namespace",)
# ``?poll=50ms``: a number, then an optional unit (seconds when there is none).
_DURATION = re.compile(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(ms|s|m|h|d)?")
_DURATION_FORMS = "seconds, or with a unit: 50ms, 2s, 5m, 12h, 7d"
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


@dataclass(frozen=True, slots=True)
class BusURL:
    """A parsed bus URL. `redacted` is safe to print: its password (or a user part without
    one, such as a NATS token) and any credential-like query option are replaced."""

    scheme: str
    redacted: str
    host: str | None
    port: int | None
    path: str
    username: str | None
    password: str | None
    query: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


# Query options whose value is a credential. No scheme of eventwire takes one, but client
# libraries do (redis-py's ``?password=``), so a URL may carry one into an error message.
_CREDENTIAL_OPTION = re.compile(r"pass|pwd|token|secret|key|auth|cred", re.IGNORECASE)
_QUERY_ITEM = re.compile(r"(?P<name>[^&=;]*)=(?P<value>[^&;]*)")
# scheme://[user:]SECRET@ anywhere in a text: the secret is the password, or the whole user
# part when there is no colon (a NATS token, or a password written without a user).
_TEXT_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://(?:[^\s/@:]*:)?)[^\s/@]+@")
MASK = "***"


def _redact(parts: SplitResult, url: str) -> str:
    netloc, query = parts.netloc, parts.query
    user_part, at, where = netloc.rpartition("@")  # host[:port] as written, even if malformed
    if at:
        user, colon, _ = user_part.partition(":")
        netloc = f"{user}:{MASK}@{where}" if colon else f"{MASK}@{where}"
    query = _QUERY_ITEM.sub(_masked_option, query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return parts._replace(netloc=netloc, query=query).geturl()


def _masked_option(item: re.Match[str]) -> str:
    if _CREDENTIAL_OPTION.search(item["name"]):
        return f"{item['name']}={MASK}"
    return item[0]


def url_secrets(url: str) -> set[str]:
    """Every secret `url` carries, as written and decoded: its password (or its user part
    when it has no password: a token), and the values of credential-like query options."""
    try:
        parts = urlsplit(url)
        found = [parts.password if parts.password is not None else parts.username]
    except ValueError:
        return set()
    found += [value for name, value in parse_qsl(parts.query) if _CREDENTIAL_OPTION.search(name)]
    return {form for secret in found if secret for form in (secret, unquote(secret))}


def redact_text(text: str, urls: Iterable[str | None] = ()) -> str:
    """`text` with the secret of every URL in it, and every secret of `urls` wherever it
    appears on its own (not inside another word), replaced by ``***``."""
    text = _TEXT_USERINFO.sub(rf"\g<head>{MASK}@", text)
    for url in urls:
        for secret in url_secrets(url or ""):
            text = re.sub(rf"(?<![/\w]){re.escape(secret)}(?!\w)", MASK, text)
    return text


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
        # Blank values kept: ``?poll=`` is refused as a bad value, not ignored.
        query=MappingProxyType(dict(parse_qsl(parts.query, keep_blank_values=True))),
    )


class URLOptions:
    """The ``?option=value`` settings of a bus URL, read through one checked reader.

    Built with the options a scheme takes (`COMMON_OPTIONS` are added), it refuses any other
    (a typo such as ``?namspace=x`` is an error, not a setting silently ignored). Each reader
    returns the option's value or its default, and raises one `ValueError` naming the option,
    the bad value, what is accepted and the URL (redacted) when the value does not fit.
    """

    __slots__ = ("known", "url")

    def __init__(self, url: BusURL, known: Iterable[str]) -> None:
        self.url = url
        self.known = frozenset((*COMMON_OPTIONS, *known))
        for name in sorted(url.query):
            if name not in self.known:
                raise self._unknown(name)

    def _unknown(self, name: str) -> ValueError:
        close = difflib.get_close_matches(name, self.known, n=1)
        hint = f" (did you mean {close[0]}=?)" if close else ""
        if _CREDENTIAL_OPTION.search(name):
            hint = f" (credentials go before the host: {self.url.scheme}://user:password@host)"
        accepted = ", ".join(f"{option}=" for option in sorted(self.known))
        return ValueError(
            f"unknown option {name}= in {self.url.redacted!r}{hint}: "
            f"{self.url.scheme}:// URLs take {accepted}"
        )

    def invalid(self, name: str, accepted: str) -> ValueError:
        """The error for option `name`, whose value is not what `accepted` describes."""
        return ValueError(
            f"{name}={self.url.query.get(name)!r} in {self.url.redacted!r}: {name}= on "
            f"{self.url.scheme}:// must be {accepted}"
        )

    def text(self, name: str) -> str | None:
        """The option as written (None when absent), for a syntax of the scheme's own."""
        if name not in self.known:
            raise KeyError(f"{name!r} is not an option of {self.url.scheme}:// URLs")
        return self.url.query.get(name)

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        """A whole number >= `minimum`."""
        value = self._checked(name, _whole, minimum, False, "a whole number")
        return default if value is None else int(value)

    def number(
        self, name: str, default: float, *, minimum: float = 0.0, above: bool = False
    ) -> float:
        """A finite number >= `minimum` (> `minimum` when `above`)."""
        value = self._checked(name, _number, minimum, above, "a number")
        return default if value is None else value

    def duration(
        self, name: str, default: float, *, minimum: float = 0.0, above: bool = False
    ) -> float:
        """Seconds: a number, optionally with a unit (``50ms``, ``2s``, ``5m``, ``12h``,
        ``7d``), >= `minimum` (> `minimum` when `above`)."""
        value = self._checked(name, _seconds, minimum, above, _DURATION_FORMS)
        return default if value is None else value

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        """One of `choices` (compared without case)."""
        raw = self.text(name)
        if raw is None:
            return default
        allowed = tuple(choices)
        if raw.lower() not in allowed:
            raise self.invalid(name, "one of " + ", ".join(allowed))
        return raw.lower()

    def _checked(
        self, name: str, parse: Callable[[str], float], minimum: float, above: bool, what: str
    ) -> float | None:
        """The option parsed (None when absent); an error unless finite and in bounds."""
        raw = self.text(name)
        if raw is None:
            return None
        value = parse(raw.strip().lower())
        if math.isfinite(value) and (value > minimum if above else value >= minimum):
            return value
        raise self.invalid(name, f"{'>' if above else '>='} {minimum:g} ({what})")


def _whole(raw: str) -> float:
    """`raw` as a whole number, NaN when it is not one."""
    try:
        return int(raw)
    except ValueError:
        return math.nan


def _number(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        return math.nan


def _seconds(raw: str) -> float:
    """``50ms``, ``2s``, ``5m``, ``12h``, ``7d`` or a plain number of seconds; NaN if none."""
    match = _DURATION.fullmatch(raw)
    if match is None:
        return math.nan
    return float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2) or "s"]
