"""`eventwire asyncapi`: the document of a sample app validates against the official AsyncAPI
3.0.0 JSON Schema, its references resolve, and typed handlers give their payload schemas."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from eventwire import Event, EventBus
from eventwire.asyncapi import build_document, dump
from tests.test_topology import APP, cli, load_app, run_chain

SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0.json"


@pytest.fixture
def app() -> Iterator[ModuleType]:
    import sys

    module = load_app()
    yield module
    sys.modules.pop(module.__name__, None)


def check(document: dict[str, Any]) -> None:
    """Valid against the official schema, and every reference points inside the document."""
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors, "\n".join(errors[:10])

    def resolve(pointer: str) -> Any:
        assert pointer.startswith("#/"), pointer
        node: Any = document
        for part in pointer[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            assert part in node, f"{pointer} does not resolve ({part!r} missing)"
            node = node[part]
        return node

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    # AsyncAPI rules the JSON Schema cannot say: an operation's messages are its channel's,
    # and an address names exactly the channel's parameters.
    for name, operation in document["operations"].items():
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel + "/messages/"), name
    for name, channel in document["channels"].items():
        named = {part[1:-1] for part in channel["address"].split(".") if part.startswith("{")}
        assert named == set(channel.get("parameters", {})), name


@pytest.fixture(autouse=True)
def quiet_dead_letters() -> Iterator[None]:
    logger = logging.getLogger("eventwire")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def test_the_official_schema_rejects_what_it_should() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert not validator.is_valid({"asyncapi": "2.6.0", "info": {"title": "t", "version": "1"}})
    assert not validator.is_valid(
        {
            "asyncapi": "3.0.0",
            "info": {"title": "t", "version": "1"},
            "operations": {"x": {"action": "publish", "channel": {"$ref": "#/channels/a"}}},
        }
    )


def test_document_of_the_declared_app_is_valid_with_typed_payloads(app: ModuleType) -> None:
    document = build_document([app.build()], title="Shop", version="2.1.0")
    check(document)
    assert document["info"] == {
        "title": "Shop",
        "version": "2.1.0",
        "description": document["info"]["description"],
    }
    schemas = document["components"]["schemas"]
    assert schemas["UserQuery"]["properties"].keys() == {"user_id", "text"}
    assert set(schemas["UserQuery"]["required"]) == {"user_id", "text"}
    assert schemas["Research"]["properties"].keys() == {"query", "summary"}  # a dataclass
    messages = document["components"]["messages"]
    # The body is the envelope; the event's payload is its `payload` field.
    body = messages["UserQuery"]["payload"]
    assert body["properties"]["payload"] == {"$ref": "#/components/schemas/UserQuery"}
    assert {"v", "id", "topic", "time"} <= set(body["required"])

    channels = document["channels"]
    assert channels["user.query"]["address"] == "user.query"
    assert channels["user.query"]["messages"] == {
        "UserQuery": {"$ref": "#/components/messages/UserQuery"}
    }
    wildcard = channels["research._one"]
    assert wildcard["address"] == "research.{p1}"
    assert wildcard["x-eventwire-topic"] == "research.*"
    # research.complete: typed by the handler that receives it through research.*
    assert set(channels["research.complete"]["messages"]) == {"Research"}

    operations = document["operations"]
    receive = operations["email.send"]
    assert receive["action"] == "receive"
    assert receive["channel"] == {"$ref": "#/channels/research._one"}
    assert receive["x-eventwire-subscription"] == {
        "name": "email.send",
        "pattern": "research.*",
        "group": "mailers",
        "agent": "email",
        "concurrency": 1,
    }
    assert receive["summary"] == "Mail each research result."
    # untyped: takes what the channel carries
    assert operations["audit"]["messages"] == [{"$ref": "#/channels/user.query/messages/UserQuery"}]
    send = operations["research.research.publishes.research.complete"]
    assert send["action"] == "send"
    assert (send["x-eventwire-declared"], send["x-eventwire-learnt"]) == (True, False)
    assert operations["main.publishes.user.query"]["x-eventwire-publisher"] == {"agent": "main"}
    assert {"id", "correlation_id", "causation_id", "source"} <= body["properties"].keys()
    trait = document["components"]["messageTraits"]["eventwireHeaders"]
    assert trait["correlationId"]["location"] == "$message.payload#/correlation_id"


async def test_learnt_publishes_become_send_operations(app: ModuleType) -> None:
    bus = app.build()
    await run_chain(bus, queries=1)
    document = build_document([bus])
    check(document)
    learnt = document["operations"]["research.research.publishes.research.metrics"]
    assert (learnt["x-eventwire-declared"], learnt["x-eventwire-learnt"]) == (False, True)
    assert document["channels"]["research.metrics"]["address"] == "research.metrics"
    dead = document["operations"]["analytics.publishes._dlq._rest"]
    assert dead["channel"] == {"$ref": "#/channels/_dlq._rest"}


def test_an_app_with_no_types_and_a_broker_url_is_valid(tmp_path: Path) -> None:
    bus = EventBus(f"sqlite:///{tmp_path}/bus.db")

    @bus.subscribe("orders.>", name="ledger", publishes=["ledger.updated"])
    async def ledger(event: Event[Any]) -> None:
        pass

    @bus.subscribe("_dlq.>", name="dlq-watcher")
    async def watch(event: Event[Event[Any]]) -> None:
        pass

    document = build_document([bus])
    check(document)
    assert document["channels"]["orders._rest"]["address"] == "orders.{rest}"
    assert document["servers"]["sqlite-1"]["protocol"] == "sqlite"
    assert document["components"]["messages"]["AnyEvent"]["payload"]["properties"]["payload"] == {}
    assert yaml.safe_load(dump(document, "yaml")) == document


def test_command_writes_json_and_yaml_documents(tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(APP.read_text())
    written = cli(tmp_path, "asyncapi", "shop:bus", "-o", "api.json", "--title", "Shop")
    assert written.returncode == 0, written.stderr
    document = json.loads((tmp_path / "api.json").read_text())
    check(document)
    assert document["info"]["title"] == "Shop"
    assert "UserQuery" in document["components"]["schemas"]

    as_yaml = cli(tmp_path, "asyncapi", "shop:bus", "--format", "yaml")
    assert as_yaml.returncode == 0, as_yaml.stderr
    check(yaml.safe_load(as_yaml.stdout))

    bad = cli(tmp_path, "asyncapi", "shop")
    assert bad.returncode == 2
    assert "is not 'module:attribute'" in bad.stderr


def test_help_shows_examples() -> None:
    shown = cli(Path.cwd(), "asyncapi", "--help")
    assert shown.returncode == 0
    assert "eventwire asyncapi myapp.agents:bus -o asyncapi.json" in shown.stdout


def test_importing_the_app_runs_nothing(tmp_path: Path) -> None:
    # The module is imported, never run: a bus that would need a broker is not started.
    (tmp_path / "remote.py").write_text(
        "from eventwire import EventBus\n"
        "bus = EventBus('redis://127.0.0.1:1/0')\n"
        "bus.subscribe('a.b', lambda e: None, name='x')\n"
    )
    done = cli(tmp_path, "asyncapi", "remote:bus")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["servers"]["redis-1"]["host"] == "127.0.0.1:1"
