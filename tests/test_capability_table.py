"""The capability table in the README and docs/backends.md is the one the backends declare
(each claim is then checked against the real broker by tests/conformance/)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eventwire.backends import SCHEMES, backend_class
from eventwire.backends.base import Capabilities

ROOT = Path(__file__).resolve().parent.parent
ROWS = {
    "durable": "Events survive a restart",
    "replay": '`start="earliest"` / `start=<datetime>` replay',
    "key_order_across_processes": "Per-key order across processes",
    "idempotent": "`idempotent=True`",
    "cross_process_drain": "`drain()` waits for other processes",
}
# Claims about several processes mean nothing for the in-process bus.
_SINGLE_PROCESS = ("key_order_across_processes", "cross_process_drain")


def declared() -> dict[str, Capabilities]:
    return {scheme: backend_class(scheme).capabilities for scheme in SCHEMES}


def render() -> str:
    table = declared()
    lines = [
        "| | " + " | ".join(f"`{scheme}://`" for scheme in table) + " |",
        "|---" * (len(table) + 1) + "|",
    ]
    for field, title in ROWS.items():
        cells = [
            "n/a: one process"
            if scheme == "memory" and field in _SINGLE_PROCESS
            else ("yes" if getattr(caps, field) else "no")
            for scheme, caps in table.items()
        ]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_every_capability_has_a_row() -> None:
    assert [f.name for f in dataclasses.fields(Capabilities)] == list(ROWS)


def test_readme_and_docs_show_the_declared_table() -> None:
    table = render()
    for document in ("README.md", "docs/backends.md"):
        text = (ROOT / document).read_text()
        assert table in text, f"{document} must contain the table:\n{table}"


if __name__ == "__main__":
    print(render())
