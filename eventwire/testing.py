"""The eventwire pytest plugin: fixtures for testing event-driven code on any backend.

pytest loads it by itself once eventwire is installed (entry point ``pytest11``). Fixtures:

- ``eventwire_bus``: a started `EventBus`, closed after the test; a test whose bus cannot
  finish its work at close fails with the unhandled events named.
- ``eventwire_recorder``: ``eventwire_bus.record()`` running for the whole test.
- ``eventwire_url``: the bus URL of this test; a broker URL gets a namespace of the test's own
  (removed afterwards), ``sqlite`` a file in the test's ``tmp_path``.

By default they run in-process (``memory://``). ``--eventwire-url URL`` (repeatable), the
``eventwire_urls`` ini option or ``@pytest.mark.eventwire(urls=[...])`` run each test on each
URL; ``memory``, ``sqlite``, ``redis``, ``nats`` and ``amqp`` name the local defaults. A test
whose broker is unreachable is skipped with a message naming it (it fails under ``CI=true``).

The fixtures are async and need pytest-asyncio (``pip install 'eventwire[testing]'``). See
docs/testing.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode

import pytest

try:
    import pytest_asyncio
except ImportError:  # the plugin loads anyway; its fixtures then say what is missing
    pytest_asyncio = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from eventwire.bus import EventBus
    from eventwire.record import Recorder

# eventwire itself is imported inside the fixtures: pytest loads this plugin in every run of
# every project that has eventwire installed, and that must stay cheap.

logger = logging.getLogger("eventwire")

DEFAULT_URLS = ("memory",)
SHORTHANDS: dict[str, str] = {
    "memory": "memory://",
    "sqlite": "sqlite:///{tmp_path}/bus.db",
    "redis": "redis://127.0.0.1:6379/0",
    "nats": "nats://127.0.0.1:4222",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
}
"""Names accepted wherever a URL is: the local default of each backend."""

# scheme -> (the service, its default port)
_SERVICES: dict[str, tuple[str, int]] = {
    "redis": ("Redis", 6379),
    "nats": ("NATS", 4222),
    "amqp": ("RabbitMQ", 5672),
}
_CLOSE_GRACE = 2.0

F = TypeVar("F", bound=Callable[..., Any])


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("eventwire")
    group.addoption(
        "--eventwire-url",
        action="append",
        dest="eventwire_urls",
        default=None,
        metavar="URL",
        help="run tests using the eventwire_url/eventwire_bus fixtures on this bus URL (or "
        "memory, sqlite, redis, nats, amqp); repeat it to run them on several",
    )
    parser.addini(
        "eventwire_urls",
        "bus URLs (or memory, sqlite, redis, nats, amqp) the eventwire fixtures run on when "
        "--eventwire-url is not given",
        type="args",
        default=[],
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "eventwire(urls=[...]): run this test's eventwire_url/eventwire_bus fixtures on each "
        "of these bus URLs (or memory, sqlite, redis, nats, amqp), whatever --eventwire-url says",
    )
    for url in config.getoption("eventwire_urls") or config.getini("eventwire_urls"):
        _check_spec(url)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "eventwire_url" not in metafunc.fixturenames:
        return
    urls = _urls_of(metafunc)
    if list(urls) == list(DEFAULT_URLS):
        return  # the fixture's default: no parametrization, so test ids stay as written
    for url in urls:
        _check_spec(url)  # again for a marker's URLs
    metafunc.parametrize("eventwire_url", urls, indirect=True, ids=[_id(url) for url in urls])


def _urls_of(metafunc: pytest.Metafunc) -> Sequence[str]:
    marker = metafunc.definition.get_closest_marker("eventwire")
    if marker is not None:
        urls = marker.kwargs.get("urls", marker.args[0] if marker.args else None)
        if isinstance(urls, str) or not urls:
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: @pytest.mark.eventwire takes urls=[...], a "
                f"non-empty list of bus URLs, got {urls!r}"
            )
        return list(urls)
    config = metafunc.config
    option: list[str] | None = config.getoption("eventwire_urls")
    ini: list[str] = config.getini("eventwire_urls")
    return option or ini or DEFAULT_URLS


def _check_spec(spec: str) -> None:
    """Refuse at collection a URL that cannot work (a typo), naming it."""
    from eventwire.backends import SCHEMES, parse_url

    if spec in SHORTHANDS:
        return
    try:
        scheme = parse_url(spec).scheme
    except ValueError as error:
        raise pytest.UsageError(f"eventwire: bad bus URL for the tests: {error}") from None
    if scheme not in SCHEMES:
        raise pytest.UsageError(
            f"eventwire: unknown scheme {scheme!r} in a bus URL for the tests; use one of "
            f"{', '.join(SCHEMES)} (or the names {', '.join(SHORTHANDS)})"
        )


def _id(spec: str) -> str:
    if spec in SHORTHANDS:
        return spec
    from eventwire.backends import parse_url

    return parse_url(spec).redacted


def isolated_url(spec: str, tmp_path: Callable[[], Any] | None = None) -> str:
    """The URL one test runs on: `spec` (a URL or a name in `SHORTHANDS`) with a namespace
    of its own on a broker (``sqlite`` alone: a file under ``tmp_path()``). Skips the test
    (fails it under ``CI=true``) when the broker is unreachable or its client missing."""
    from eventwire.backends import parse_url, resolve_url

    if spec == "sqlite":
        if tmp_path is None:
            raise ValueError("the 'sqlite' shorthand needs a tmp_path for its file")
        return SHORTHANDS["sqlite"].format(tmp_path=tmp_path())
    url = SHORTHANDS.get(spec, spec)
    try:
        url = resolve_url(url)
    except ImportError as error:
        _unavailable(str(error))
    parsed = parse_url(url)
    if parsed.scheme == "memory":
        return url
    if parsed.scheme in _SERVICES:
        service, default_port = _SERVICES[parsed.scheme]
        host, port = parsed.host or "127.0.0.1", parsed.port or default_port
        if not _reachable(host, port):
            _unavailable(
                f"{service} is not reachable at {host}:{port} (bus URL {parsed.redacted}); "
                "start it, or run without this URL"
            )
    return _with_unique_namespace(url)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"eventwire: {message} (CI is set, so this fails instead of skipping)")
    pytest.skip(f"eventwire: {message}")


def _with_unique_namespace(url: str) -> str:
    """`url` with ``?namespace=`` set to a new one (kept as a prefix if it had one)."""
    # Split by hand: urlunsplit() would rewrite ``sqlite:////abs/path`` URLs.
    base, _, query = url.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    given = dict(pairs).get("namespace")
    prefix = f"{given}_" if given else "test_"
    namespace = f"{prefix[:50]}{uuid.uuid4().hex[:12]}"
    pairs = [(k, v) for k, v in pairs if k != "namespace"] + [("namespace", namespace)]
    return f"{base}?{urlencode(pairs)}"


async def destroy_namespace(url: str) -> None:
    """Remove what the tests stored under `url`'s namespace on its broker (best effort)."""
    from eventwire.backends import open_backend

    backend = open_backend(url)
    try:
        await backend.connect()
        await backend.destroy()
    except Exception:
        logger.warning("eventwire: could not remove the test namespace of %s", backend.url.redacted)
    finally:
        with contextlib.suppress(Exception):
            await backend.close()


def _async_fixture(function: F) -> F:
    """An async fixture through pytest-asyncio (so it works in strict mode too), or, without
    pytest-asyncio, a fixture that fails saying what to install."""
    if pytest_asyncio is not None:
        return cast(F, pytest_asyncio.fixture(function))

    def missing() -> None:
        pytest.fail(
            f"the {function.__name__} fixture needs pytest-asyncio, which is not installed: "
            "pip install 'eventwire[testing]'"
        )

    return cast(F, pytest.fixture(name=function.__name__)(missing))


@_async_fixture
async def eventwire_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The bus URL of this test (``memory://`` unless parametrized, see the module doc); a
    broker namespace of its own, removed after the test."""
    spec: str = getattr(request, "param", DEFAULT_URLS[0])
    url = isolated_url(spec, lambda: request.getfixturevalue("tmp_path"))
    yield url
    if spec != "sqlite":  # that one's file goes with tmp_path
        await destroy_namespace(url)


@_async_fixture
async def eventwire_bus(eventwire_url: str) -> AsyncIterator[EventBus]:
    """A started `EventBus` on `eventwire_url`, closed after the test. If closing leaves
    events unhandled (after a 2 s grace) or fails, the test errors naming them."""
    from eventwire.bus import EventBus

    bus = EventBus(eventwire_url, close_grace=_CLOSE_GRACE, redeliver_after=5.0)
    await bus.start()
    yield bus
    try:
        report = await bus.close()
    except Exception as error:
        pytest.fail(
            f"eventwire_bus: closing {bus.safe_url} failed: {type(error).__name__}: {error}"
        )
    if not report.clean:
        unhandled = "\n".join(
            f"  {u.subscription} <- {u.event.topic} {u.event.id} ({u.state.replace('_', ' ')})"
            for u in report.unhandled
        )
        pytest.fail(
            f"eventwire_bus: the bus closed with {len(report.unhandled)} event(s) unhandled "
            f"after a {_CLOSE_GRACE}s grace:\n{unhandled}\n"
            "A handler was still busy or behind when the test ended: wait for the work "
            "(recorder.wait_for / wait_handled, or bus.drain()) before the test returns.",
            pytrace=False,
        )


@_async_fixture
async def eventwire_recorder(eventwire_bus: EventBus) -> AsyncIterator[Recorder]:
    """``eventwire_bus.record()`` (every topic) for the whole test."""
    async with eventwire_bus.record() as recorder:
        yield recorder
