"""No credential a bus URL can carry is ever printed: every form each client library takes,
through every place a URL is shown (repr, `safe_url`, connection errors, URL errors, the
command line's output and errors)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eventwire import EventBus
from eventwire.backends import parse_url
from eventwire.backends.base import BackendConnectionError
from eventwire.backends.url import redact_text, url_secrets
from tests.conformance.conftest import destroy
from tests.services import free_port, require_service, unique_namespace, with_namespace

EVENTWIRE = str(Path(sys.executable).with_name("eventwire"))
SECRET = "S3cr3tValue"

# Every way a credential can be written into a URL of a scheme eventwire takes.
FORMS = {
    "redis password": f"redis://:{SECRET}@127.0.0.1:{{port}}/0",
    "redis user and password": f"redis://app:{SECRET}@127.0.0.1:{{port}}/0",
    "redis password without a user": f"redis://{SECRET}@127.0.0.1:{{port}}/0",
    "redis escaped password": f"redis://:{SECRET}%21@127.0.0.1:{{port}}/0",
    "nats token": f"nats://{SECRET}@127.0.0.1:{{port}}",
    "nats user and password": f"nats://app:{SECRET}@127.0.0.1:{{port}}",
    "amqp user and password": f"amqp://guest:{SECRET}@127.0.0.1:{{port}}/",
}
# Credentials in the query string: no scheme takes them, so they are refused, but the refusal
# must not show them either.
QUERY_FORMS = {
    "redis ?password=": f"redis://127.0.0.1:6379/0?password={SECRET}",
    "nats ?token=": f"nats://127.0.0.1:4222?token={SECRET}",
    "amqp ?auth_secret=": f"amqp://guest@127.0.0.1:5672/?auth_secret={SECRET}",
}


def shown(text: str) -> None:
    assert SECRET not in text, f"the secret was shown: {text!r}"


@pytest.mark.parametrize("url", FORMS.values(), ids=FORMS.keys())
def test_repr_and_safe_url_mask_every_form(url: str) -> None:
    url = url.format(port=1)
    bus = EventBus(url)
    for text in (repr(bus), bus.safe_url, parse_url(url).redacted, redact_text(f"at {url}")):
        shown(text)
        assert "***@127.0.0.1" in text
    assert SECRET in "".join(url_secrets(url))


@pytest.mark.parametrize("url", QUERY_FORMS.values(), ids=QUERY_FORMS.keys())
def test_a_credential_in_the_query_is_refused_without_showing_it(url: str) -> None:
    with pytest.raises(ValueError, match="credentials go before the host") as refused:
        EventBus(url)
    shown(str(refused.value))
    assert "=***" in str(refused.value)


def test_text_redaction_masks_secrets_of_known_urls_wherever_they_appear() -> None:
    url = f"nats://{SECRET}@127.0.0.1:4222"
    text = redact_text(f"authorization violation for token {SECRET} at {url}", [url])
    assert text == "authorization violation for token *** at nats://***@127.0.0.1:4222"


@pytest.mark.parametrize("url", FORMS.values(), ids=FORMS.keys())
async def test_an_unreachable_broker_error_masks_every_form(url: str) -> None:
    port = free_port()
    bus = EventBus(url.format(port=port))
    with pytest.raises(BackendConnectionError) as failed:
        await asyncio.wait_for(bus.start(), timeout=30)
    shown(str(failed.value))
    assert f"127.0.0.1:{port}" in str(failed.value)


def eventwire(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EVENTWIRE_URL"}
    return subprocess.run(
        [EVENTWIRE, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )


# Commands that connect to the URL they are given, each with its own arguments.
COMMANDS = {
    "stats": ["stats"],
    "tail": ["tail", ">", "--timeout", "5"],
    "dlq list": ["dlq", "list"],
    "subscriptions list": ["subscriptions", "list"],
    "publish": ["publish", "t.x", "{}"],
    "run": ["run", "secretapp:bus"],
}
APP = textwrap.dedent(
    """
    from eventwire import EventBus

    bus = EventBus()

    @bus.subscribe("secret.test", name="secret-test")
    async def handle(event) -> None:
        pass
    """
)


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
@pytest.mark.parametrize(
    "form", ["redis password without a user", "nats token", "amqp user and password"]
)
def test_command_line_errors_mask_every_form(command: list[str], form: str, tmp_path: Path) -> None:
    (tmp_path / "secretapp.py").write_text(APP, encoding="utf-8")
    url = FORMS[form].format(port=free_port())
    result = eventwire(*command, "--url", url, cwd=tmp_path)
    assert result.returncode != 0, result
    shown(result.stdout + result.stderr)
    assert "***@127.0.0.1" in result.stderr


def test_the_run_start_line_masks_a_nats_token(tmp_path: Path) -> None:
    # A NATS server without authorization accepts a token: the app really runs.
    plain = with_namespace(require_service("nats"), unique_namespace())
    url = plain.replace("nats://", f"nats://{SECRET}@", 1)
    (tmp_path / "secretapp.py").write_text(APP, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "EVENTWIRE_URL"}
    process = subprocess.Popen(
        [EVENTWIRE, "run", "secretapp:bus", "--url", url],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        start_line = process.stdout.readline()  # bounded by the test timeout
        assert "running 1 subscription(s) on nats://***@" in start_line, start_line
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
        asyncio.run(destroy(plain))
    shown(start_line + out + err)
