"""The AsyncAPI document describes the wire as it is on each broker (NATS subject, AMQP exchange
and routing key, Redis stream and topic field; the envelope as the body; the headers beside
it), and the official AsyncAPI parser (@asyncapi/parser, installed with npm) finds no error in
it. A document with a broken binding is rejected by the same parser, so the check can fail.

Needs Node.js and npm: outside CI the test is skipped without them; with CI=true it fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from eventwire import Event, EventBus
from eventwire.asyncapi import build_document

VALIDATOR = Path(__file__).parent / "data" / "asyncapi_validate.mjs"
# Installed once per checkout (not committed: .gitignore), pinned.
PARSER_DIR = Path(__file__).parent.parent / ".cache" / "asyncapi-parser"
PARSER = "@asyncapi/parser@3.6.6"
URLS = {
    "nats": "nats://127.0.0.1:4222?namespace=shop",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/?namespace=shop",
    "redis": "redis://127.0.0.1:6379/0?namespace=shop",
    "memory": "memory://",
}


class Order(BaseModel):
    order_id: str
    total: float


def app(url: str) -> EventBus:
    """A bus (never started: the document needs no connection) with typed, wildcard, grouped
    and dead-letter subscriptions and declared publishes."""
    bus = EventBus(url)

    @bus.subscribe("orders.created", name="billing", publishes=["invoices.sent"])
    async def bill(event: Event[Order]) -> None:
        """Bill each new order."""

    @bus.subscribe("orders.*", name="audit", group="auditors")
    async def audit(event: Event[Any]) -> None:
        pass

    @bus.subscribe("_dlq.>", name="dlq-watch")
    async def watch(event: Event[Any]) -> None:
        pass

    return bus


@pytest.fixture(scope="module")
def node_parser() -> Path:
    """The directory where @asyncapi/parser is installed (installing it the first time)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        message = "Node.js and npm are not installed, so the official AsyncAPI parser cannot run"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if not (PARSER_DIR / "node_modules" / "@asyncapi" / "parser").is_dir():
        PARSER_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--prefix", str(PARSER_DIR), "--no-audit", "--no-fund", PARSER],
            check=True,
            capture_output=True,
            timeout=300,
        )
    shutil.copy(VALIDATOR, PARSER_DIR / VALIDATOR.name)
    return PARSER_DIR


def validate(parser_dir: Path, documents: dict[str, dict[str, Any]]) -> str:
    """Run the official parser on each document; its errors (empty when all are valid)."""
    files = []
    for name, document in documents.items():
        path = parser_dir / f"{name}.json"
        path.write_text(json.dumps(document))
        files.append(str(path))
    done = subprocess.run(
        ["node", VALIDATOR.name, *files],
        cwd=parser_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.stdout


def test_every_broker_s_document_is_valid_for_the_official_parser(node_parser: Path) -> None:
    documents = {name: build_document([app(url)], title="Shop") for name, url in URLS.items()}
    assert validate(node_parser, documents) == ""


def test_the_official_parser_rejects_a_broken_binding(node_parser: Path) -> None:
    document = build_document([app(URLS["amqp"])], title="Shop")
    channel = next(iter(document["channels"].values()))
    channel["bindings"]["amqp"]["exchange"]["type"] = "bogus"
    errors = validate(node_parser, {"broken": document})
    assert "exchange" in errors


def test_channels_say_where_each_broker_carries_a_topic() -> None:
    nats = build_document([app(URLS["nats"])])["channels"]
    assert nats["orders.created"]["address"] == "shop.orders.created"
    assert nats["orders._one"]["address"] == "shop.orders.{p1}"
    assert nats["orders._one"]["x-eventwire-nats"] == {
        "stream": "eventwire_shop",
        "subject": "shop.orders.*",
    }

    amqp = build_document([app(URLS["amqp"])])
    channels = amqp["channels"]
    assert channels["orders.created"]["address"] == "orders.created"
    binding = channels["orders.created"]["bindings"]["amqp"]
    assert binding["is"] == "routingKey"
    assert binding["exchange"] == {
        "name": "shop",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": "/",
    }
    assert channels["_dlq._rest"]["bindings"]["amqp"]["exchange"]["name"] == "shop.reserved"
    send = amqp["operations"]["billing.publishes.invoices.sent"]
    assert send["bindings"] == {"amqp": {"deliveryMode": 2, "bindingVersion": "0.3.0"}}
    headers = amqp["components"]["messageTraits"]["eventwireHeaders"]["headers"]
    assert set(headers["properties"]) == {"traceparent", "tracestate"}

    redis = build_document([app(URLS["redis"])])
    channel = redis["channels"]["orders._one"]
    assert channel["address"] == "{shop}:events"
    assert "parameters" not in channel  # the address holds no topic
    assert channel["x-eventwire-redis"] == {"stream": "{shop}:events", "topicField": "orders.*"}
    fields = redis["components"]["messageTraits"]["eventwireHeaders"]["headers"]["properties"]
    assert {"id", "topic", "key", "traceparent"} <= set(fields)

    body = redis["components"]["messages"]["Order"]["payload"]
    assert body["properties"]["payload"] == {"$ref": "#/components/schemas/Order"}
    assert set(redis["components"]["schemas"]["Order"]["properties"]) == {"order_id", "total"}
