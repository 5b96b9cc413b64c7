"""The ``eventwire`` command line.

One typer app (`eventwire.cli._app.app`); each module of this package registers a few
commands on it. Commands import what they need lazily, so ``eventwire --help`` stays fast.
"""

from __future__ import annotations

from eventwire.cli import (  # noqa: F401  (registers their commands)
    describe,
    dlq,
    inspect,
    run,
    runs,
    stats,
    subscriptions,
)
from eventwire.cli._app import app


def main() -> None:
    """Entry point of the ``eventwire`` console script."""
    app()


__all__ = ["app", "main"]
