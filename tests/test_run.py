"""`eventwire run module:bus` through its real entry point, stopped by a real signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eventwire import EventBus
from tests.services import require_service, unique_namespace, with_namespace

EVENTWIRE = str(Path(sys.executable).with_name("eventwire"))

APP = textwrap.dedent(
    """
    import asyncio
    import os
    from eventwire import Agent, Event, EventBus, on

    bus = EventBus()

    class Ticker(Agent):
        async def on_start(self) -> None:
            await self.publish("tick", 1)
            if os.environ.get("TICK_SLOW"):
                await self.publish("slow", 1)

        async def on_stop(self) -> None:
            print("[TICKER] stopping", flush=True)

    @bus.subscribe("tick", name="printer")
    async def printer(event: Event[int]) -> None:
        print(f"[PRINTER] tick {event.payload} from {event.source}", flush=True)

    @bus.subscribe("slow", name="slow")
    async def slow(event: Event[int]) -> None:
        await asyncio.sleep(60)

    bus.register(Ticker("ticker"))
    """
)


def start(tmp_path: Path, *args: str, slow: bool = False) -> subprocess.Popen[str]:
    (tmp_path / "tickapp.py").write_text(APP, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "EVENTWIRE_URL"}
    if slow:
        env["TICK_SLOW"] = "1"
    return subprocess.Popen(
        [EVENTWIRE, "run", "tickapp:bus", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_until(process: subprocess.Popen[str], marker: str) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:  # bounded by the test timeout and the process's own exit
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} never printed; got {lines}")


def test_run_prints_status_handles_events_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = start(tmp_path, "--grace", "2")
    try:
        seen = read_until(process, "[PRINTER] tick 1 from ticker")
        status = next(line for line in seen if line.startswith("eventwire: running"))
        assert "2 subscription(s) on memory://" in status
        assert "printer" in status
        assert "slow" in status
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "[TICKER] stopping" in out
    assert "eventwire: stopped, every event handled" in out


def test_run_reports_work_left_at_shutdown_and_exits_non_zero(tmp_path: Path) -> None:
    process = start(tmp_path, "--grace", "0.2", slow=True)
    try:
        read_until(process, "[PRINTER] tick 1")
        process.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 1, err
    assert "eventwire: stopped with 1 unhandled event(s): slow<-slow" in out


def test_run_reports_bad_targets(tmp_path: Path) -> None:
    (tmp_path / "tickapp.py").write_text(APP, encoding="utf-8")
    for target, message in [
        ("tickapp", "is not 'module:attribute'"),
        ("nosuchmodule:bus", "cannot import module 'nosuchmodule'"),
        ("tickapp:missing", "has no attribute 'missing'"),
        ("tickapp:printer", "not an EventBus"),
    ]:
        result = subprocess.run(
            [EVENTWIRE, "run", target],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2, (target, result.stdout, result.stderr)
        assert message in result.stderr, (target, result.stderr)
        assert result.stdout == "", (target, result.stdout)


def test_url_option_and_environment_choose_the_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENTWIRE_URL", "memory://")
    assert EventBus().url == "memory://"
    monkeypatch.setenv("EVENTWIRE_URL", "kafka://nowhere")
    with pytest.raises(ValueError, match="unknown bus URL scheme 'kafka'"):
        EventBus()
    assert EventBus("memory://").url == "memory://"  # an explicit URL wins
    (tmp_path / "tickapp.py").write_text(APP, encoding="utf-8")
    result = subprocess.run(
        [EVENTWIRE, "run", "tickapp:bus", "--url", "kafka://nowhere"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "unknown bus URL scheme 'kafka'" in result.stdout + result.stderr


STARTUP_ERRORS = {
    "signature": (
        """
        from eventwire import EventBus

        bus = EventBus()

        @bus.subscribe("a.b", name="two_args")
        async def two_args(first, second): ...
        """,
        "must accept the event as its one positional argument",
    ),
    "raising": (
        """
        raise RuntimeError("settings.toml is missing")
        """,
        "importing 'raising:bus' raised RuntimeError: settings.toml is missing",
    ),
}


def run_app(tmp_path: Path, module: str, source: str) -> subprocess.CompletedProcess[str]:
    """``eventwire run <module>:bus`` on `source` saved as `module`.py, to its end."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return subprocess.run(
        [EVENTWIRE, "run", f"{module}:bus"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr  # no traceback


@pytest.mark.parametrize("module", sorted(STARTUP_ERRORS))
def test_startup_errors_are_one_line_and_exit_2(tmp_path: Path, module: str) -> None:
    source, message = STARTUP_ERRORS[module]
    assert_one_line_error(run_app(tmp_path, module, source), message)


def test_an_unsupported_capability_is_one_line_and_exit_2(tmp_path: Path) -> None:
    url = with_namespace(require_service("rabbitmq"), unique_namespace())
    app = f"""
        from eventwire import EventBus

        bus = EventBus({url!r})

        @bus.subscribe("a.b", name="once", idempotent=True)
        async def once(event): ...
        """
    result = run_app(tmp_path, "idempotent", app)
    assert_one_line_error(result, "idempotent=True, but the amqp:// backend cannot")
    assert "guest:guest" not in result.stderr


STUCK = textwrap.dedent(
    """
    import asyncio
    import time
    from eventwire import Agent, Event, EventBus

    bus = EventBus()

    class Starter(Agent):
        async def on_start(self) -> None:
            await self.publish("work", 1)

    @bus.subscribe("work", name="blocking")
    def blocking(event: Event[int]) -> None:
        print("[BLOCKING] started", flush=True)
        time.sleep(3600)  # line 15: a plain function the bus cannot interrupt

    @bus.subscribe("work", name="offloaded")
    async def offloaded(event: Event[int]) -> None:
        print("[OFFLOADED] started", flush=True)
        await asyncio.to_thread(time.sleep, 3600)

    bus.register(Starter("starter"))
    """
)


def test_a_stuck_plain_function_does_not_keep_run_alive_past_the_grace(tmp_path: Path) -> None:
    (tmp_path / "stuckapp.py").write_text(STUCK, encoding="utf-8")
    process = subprocess.Popen(
        [EVENTWIRE, "run", "stuckapp:bus", "--grace", "0.3"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = ""
        while "[BLOCKING]" not in seen or "[OFFLOADED]" not in seen:
            # Both handlers are in their threads (their lines may interleave).
            seen += "\n".join(read_until(process, "started"))
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)  # hung for ever before
    finally:
        process.kill()
    assert process.returncode == 1, err
    assert "eventwire: stopped with 2 unhandled event(s)" in out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert (
        f"error: subscription 'blocking' is still in blocking at {tmp_path / 'stuckapp.py'}:15 "
        "after the 0.3s grace period"
    ) in errors, err
    assert "error: thread 'asyncio_0' is still in time.sleep after the 0.3s grace period" in (
        errors
    ), err
    assert errors[-1].startswith("error: exiting without waiting for them"), err
