"""The one runner every ``eventwire`` command goes through: errors on standard error as one
line, an exit status from one table, no password; and output that is not a terminal is not
cut at 80 columns. Through the real entry point, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer

from eventwire.cli import app
from eventwire.cli._app import CommandError, RunnerCommand, explain, redact

EVENTWIRE = str(Path(sys.executable).parent / "eventwire")
HINT = "pip install 'eventwire[redis]'"


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``eventwire ARGS`` with its output on pipes, as in ``eventwire ... | less``: no
    EVENTWIRE_URL, and no COLUMNS, which a shell does not export."""
    environment = {
        k: v for k, v in os.environ.items() if k not in ("EVENTWIRE_URL", "COLUMNS", "LINES")
    }
    environment.update(NO_COLOR="1", **(env or {}))
    return subprocess.run(
        [EVENTWIRE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        check=False,
    )


def test_every_command_goes_through_the_runner() -> None:
    def commands(group: object, path: str) -> list[tuple[str, object]]:
        found = []
        for name, command in getattr(group, "commands", {}).items():
            if getattr(command, "commands", None) is not None:
                found += commands(command, f"{path} {name}")
            else:
                found.append((f"{path} {name}", command))
        return found

    every = commands(typer.main.get_command(app), "eventwire")
    assert len(every) >= 14  # demo, run, publish, version, tail, ..., dlq list|show|retry|purge
    assert [name for name, command in every if not isinstance(command, RunnerCommand)] == []


@pytest.fixture
def without_redis(tmp_path: Path) -> dict[str, str]:
    """An environment in which the redis client looks uninstalled."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['redis'] = None  # find_spec('redis') is None\n",
        encoding="utf-8",
    )
    return {"PYTHONPATH": str(tmp_path)}


@pytest.mark.parametrize(
    "command",
    [
        ["demo"],
        ["publish", "t.x", "1"],
        ["tail", ">"],
        ["stats"],
        ["dlq", "list"],
        ["trace", "01a214a1-b31d-7788-9f3e-049a00000000"],
    ],
)
def test_the_install_hint_shows_the_extra_with_its_brackets(
    command: list[str], without_redis: dict[str, str]
) -> None:
    result = cli(*command, "--url", "redis://127.0.0.1:6379/0", env=without_redis)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert HINT in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_run_shows_the_install_hint_of_its_app(
    tmp_path: Path, without_redis: dict[str, str]
) -> None:
    (tmp_path / "agents.py").write_text(
        "from eventwire import EventBus\n\nbus = EventBus('redis://127.0.0.1:6379/0')\n",
        encoding="utf-8",
    )
    result = cli("run", "agents:bus", cwd=tmp_path, env=without_redis)
    assert result.returncode == 2, result.stderr
    assert HINT in result.stderr
    assert result.stdout == ""


def test_demo_errors_go_to_standard_error() -> None:
    result = cli("demo", "--url", "kafka://nowhere")
    assert result.returncode == 2
    assert "unknown bus URL scheme 'kafka'" in result.stderr
    assert "kafka" not in result.stdout


def test_an_error_in_the_apps_own_start_up_is_one_line(tmp_path: Path) -> None:
    app_source = """
        from eventwire import Agent, EventBus

        bus = EventBus()

        class Loader(Agent):
            async def on_start(self) -> None:
                raise RuntimeError("the model file is missing")

        bus.register(Loader("loader"))
        """
    (tmp_path / "loading.py").write_text(textwrap.dedent(app_source), encoding="utf-8")
    result = cli("run", "loading:bus", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "error: starting 'loading:bus' raised RuntimeError: the model file is missing\n"
    )
    shown = cli("run", "loading:bus", cwd=tmp_path, env={"EVENTWIRE_TRACEBACK": "1"})
    assert shown.returncode == 1
    assert "Traceback" in shown.stderr
    assert "on_start" in shown.stderr


def test_output_that_is_not_a_terminal_is_not_cut_at_80_columns() -> None:
    query = "Which of our " + "very " * 40 + "long running agents handled the refund [#1234]?"
    result = cli("demo", "-q", query)
    assert result.returncode == 0, result.stderr
    [asked] = [line for line in result.stdout.splitlines() if line.startswith("[MAIN]")]
    assert asked.endswith(f"asks: {query}")  # one line, brackets included
    assert not any(line.startswith("─" * 20) for line in result.stdout.splitlines())


def test_a_long_error_stays_on_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    result = cli("publish", "t." + "x" * 300 + " y", "1", "--url", url)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "304 bytes long" in result.stderr
    assert len(result.stderr.strip()) > 200  # long enough that wrapping at 80 would show


# -- the table, one row at a time ------------------------------------------------------------


def test_the_exit_status_of_each_kind_of_error() -> None:
    from eventwire.backends.base import BackendCapabilityError, BackendConnectionError
    from eventwire.dlq import DeadLetterNotFoundError
    from eventwire.errors import BusNotRunningError, InvalidTopicError, PublishTimeoutError
    from eventwire.history import HistoryUnavailableError
    from eventwire.runner import RunError

    assert explain(CommandError("say why", 1)) == (1, "say why")
    assert explain(RunError("cannot import module 'x'")) == (2, "cannot import module 'x'")
    assert explain(BackendConnectionError("no broker"))[0] == 2
    assert explain(BackendCapabilityError("cannot"))[0] == 2
    assert explain(HistoryUnavailableError("no history"))[0] == 2
    assert explain(InvalidTopicError("bad topic"))[0] == 2
    assert explain(ImportError("pip install 'eventwire[nats]'")) == (
        2,
        "pip install 'eventwire[nats]'",
    )
    assert explain(DeadLetterNotFoundError("no letter"))[0] == 1
    assert explain(PublishTimeoutError("slow"))[0] == 1
    assert explain(TimeoutError()) == (1, "TimeoutError")
    assert explain(BusNotRunningError("not running"))[0] == 1
    assert explain(ConnectionRefusedError(111, "refused"), ["redis://:pw@h:1/0"]) == (
        2,
        "cannot reach redis://:***@h:1/0: [Errno 111] refused",
    )
    code, message = explain(ZeroDivisionError("division by zero"))
    assert code == 1
    assert message.startswith("unexpected ZeroDivisionError: division by zero")
    assert "EVENTWIRE_TRACEBACK=1" in message
    assert explain(ValueError("first\n  second\n")) == (2, "first; second")


def test_no_password_is_printed() -> None:
    assert redact("failed: amqp://guest:s3cret@host:5672/ said no") == (
        "failed: amqp://guest:***@host:5672/ said no"
    )
    assert redact("login with s3cret%21 refused", ["nats://u:s3cret%21@h"]) == (
        "login with *** refused"
    )
    assert redact("login with s3cret! refused", ["nats://u:s3cret%21@h"]) == (
        "login with *** refused"
    )
    # The user name stays readable when it is the password too.
    assert redact("amqp://guest:guest@h/ refused guest", ["amqp://guest:guest@h/"]) == (
        "amqp://guest:***@h/ refused ***"
    )


@pytest.mark.parametrize("command", ["replay", "trace", "topology", "asyncapi"])
def test_help_says_rabbitmq_keeps_history_with_the_url_option(command: str) -> None:
    shown = cli(command, "--help", env={"COLUMNS": "300"})
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "not amqp" not in text
    assert "amqp" in text
    assert "?history=" in text
