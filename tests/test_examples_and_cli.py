"""The examples, the ``eventwire`` command and the demo behind it must run and say what they
should. Everything that a user would run is run the same way here: as a separate process."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

import eventwire
from eventwire.demo import DEFAULT_QUERIES, run_demo

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# The console script pip installs next to the interpreter: the real entry point.
EVENTWIRE = Path(sys.executable).parent / ("eventwire.exe" if os.name == "nt" else "eventwire")

# A row of the demo's summary table, whatever box characters the terminal allows.
TABLE_ROW = re.compile(r"^\W*([\w.-]+)\W+(\d+)\W+(\d+)\W+(\d+)\W+(\d+\.\d+)\W*$")


def _env() -> dict[str, str]:
    """A predictable terminal for rich: wide enough not to wrap, no color codes."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(NO_COLOR="1", COLUMNS="120", PYTHONIOENCODING="utf-8")
    return env


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        timeout=30,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_env(),
        check=False,
    )


def run_example(name: str) -> list[str]:
    """Run one example as a user would; return its output lines after checking it succeeded
    without printing a traceback."""
    result = _run([sys.executable, str(EXAMPLES / name)])
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout.splitlines()


def starting(lines: list[str], prefix: str) -> list[str]:
    return [line for line in lines if line.startswith(prefix)]


# -- examples -----------------------------------------------------------------------------


def test_every_example_is_tested() -> None:
    tested = {
        "01_fan_out.py",
        "02_audit_logger.py",
        "03_notifier.py",
        "04_cross_agent_chain.py",
        "05_error_handling.py",
    }
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


def test_01_fan_out_reaches_both_subscribers() -> None:
    lines = run_example("01_fan_out.py")
    assert "[printer]  user-42 asked: Which plan includes single sign-on?" in lines
    assert "[printer]  user-77 asked: Can I export my data as CSV?" in lines
    assert "[sessions] query in session sess-a1" in lines
    assert "[sessions] query in session sess-b2" in lines
    assert "metadata is read-only: every subscriber saw the same values" in lines
    # The unheard user.logout reached nobody: each subscriber handled exactly the 2 queries.
    assert "printer: handled 2 events" in lines
    assert "sessions: handled 2 events" in lines
    assert lines[-1] == "Every subscriber handled every query."


def test_02_audit_logger_records_every_user_event_and_nothing_else() -> None:
    lines = run_example("02_audit_logger.py")
    assert starting(lines, "[AUDIT]") == [
        "[AUDIT] user-123 user.query: What was our revenue in March?",
        "[AUDIT] user-123 user.feedback: thumbs-down: answer was out of date",
        "[AUDIT] user-456 user.query: Show me open invoices over 10k",
    ]
    assert "Audit trail: 3 records" in lines
    assert not any("heartbeat" in line for line in lines)


def test_03_notifier_filters_and_does_not_slow_the_log() -> None:
    lines = run_example("03_notifier.py")
    assert len(starting(lines, "[LOG]")) == 4
    pushed = starting(lines, "[NOTIFY] pushed:")
    assert sorted(pushed) == [
        "[NOTIFY] pushed: URGENT query sess-A from user-1: "
        "Still locked out and I have a demo in 5 minutes",
        "[NOTIFY] pushed: new session sess-A from user-1: I cannot reset my password",
        "[NOTIFY] pushed: new session sess-B from user-2: "
        "Where can I download last month's invoice?",
    ]
    assert "[NOTIFY] nothing to send for session sess-A" in lines
    assert any(line.startswith("log handled all 4 queries within") for line in lines)
    assert any(line.startswith("notifier sent 3 notifications") for line in lines)
    # Every log line was printed before the first push came back.
    first_push = lines.index(pushed[0]) if pushed else len(lines)
    assert max(lines.index(line) for line in starting(lines, "[LOG]")) < first_push


def test_04_cross_agent_chain_links_every_event_to_its_query() -> None:
    lines = run_example("04_cross_agent_chain.py")
    assert "[RESEARCH] working on: How do we rotate API keys?" in lines
    assert "[RESEARCH] working on: Who approves new vendors?" in lines
    assert any(line.startswith("[EMAIL]    to ana: ") for line in lines)
    assert any(line.startswith("[EMAIL]    to ben: ") for line in lines)
    chain_heads = starting(lines, "Chain of ")
    assert [head.split("'")[0] for head in chain_heads] == ["Chain of ana", "Chain of ben"]
    steps = [line.split() for line in lines if line.startswith("  ")]
    expected_chain = [
        ["user.query", "source=-", "caused", "by", "-"],
        ["research.complete", "source=research", "caused", "by", "user.query"],
        ["email.sent", "source=email", "caused", "by", "research.complete"],
    ]
    assert steps == expected_chain * 2


def test_05_error_handling_retries_dead_letters_and_isolates() -> None:
    lines = run_example("05_error_handling.py")
    assert len(starting(lines, "[AUDIT]  logged:")) == 3
    assert len(starting(lines, "[SEARCH] try 1 failed")) == 3
    assert len(starting(lines, "[SEARCH] try 2 indexed:")) == 3
    assert len(starting(lines, "[CRM]    try 3 failed")) == 3
    dead = starting(lines, "[DLQ]")
    assert len(dead) == 3
    assert all(line.endswith("after 3 attempts: TimeoutError: CRM did not answer") for line in dead)
    assert "  audit        handled=3 retried=0 dead_lettered=0" in lines
    assert "  search       handled=3 retried=3 dead_lettered=0" in lines
    assert "  crm          handled=0 retried=6 dead_lettered=3" in lines
    assert "  dead-letters handled=3 retried=0 dead_lettered=0" in lines
    assert lines[-1] == "audit handled 3 of 3 queries: failures elsewhere did not touch it"


# -- the eventwire command ----------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    assert EVENTWIRE.exists(), (
        f"no console script at {EVENTWIRE}: install the project with `pip install -e .`"
    )
    return _run([str(EVENTWIRE), *args])


def table_rows(output: str) -> dict[str, tuple[int, int, int, float]]:
    rows: dict[str, tuple[int, int, int, float]] = {}
    for line in output.splitlines():
        match = TABLE_ROW.match(line)
        if match:
            name, handled, retried, dead, mean = match.groups()
            rows[name] = (int(handled), int(retried), int(dead), float(mean))
    return rows


def test_cli_demo_prints_agents_dead_letters_and_summary() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    out = result.stdout
    lines = out.splitlines()
    n = len(DEFAULT_QUERIES)
    for tag in ("[MAIN]", "[AUDIT]", "[NOTIFY]", "[RESEARCH]", "[EMAIL]"):
        assert len(starting(lines, tag)) == n, tag
    assert len(starting(lines, "[ANALYTICS]")) == 3 * n
    dead = starting(lines, "[DLQ]")
    assert len(dead) == n
    assert all("analytics failed 3 times on user.query: ConnectionError" in d for d in dead)
    # The email for each query carries that query's correlation id, shown as its label.
    for number in range(1, n + 1):
        assert any(line.split()[:2] == ["[EMAIL]", f"q{number}"] for line in lines)

    rows = table_rows(out)
    counts = {name: row[:3] for name, row in rows.items()}
    assert counts == {
        "audit": (n, 0, 0),
        "notifier": (n, 0, 0),
        "research.handle_query": (n, 0, 0),
        "email.send_summary": (n, 0, 0),
        "analytics": (0, 2 * n, n),
        "dlq-watcher": (n, 0, 0),
    }
    assert f"{n} queries -> {n} emails, {n} dead letters on _dlq.user.query" in out


def test_cli_demo_takes_queries_and_prints_them_verbatim() -> None:
    result = run_cli("demo", "-q", "Is [bold]this[/bold] escaped?", "--queries", "Second one")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.endswith("asks: Is [bold]this[/bold] escaped?") for line in lines)
    assert any(line.endswith("asks: Second one") for line in lines)
    assert table_rows(result.stdout)["audit"][:3] == (2, 0, 0)
    assert table_rows(result.stdout)["analytics"][:3] == (0, 4, 2)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--help"], ["demo", "version", "Example"]),
        (["demo", "--help"], ["--queries", "-q", "eventwire demo -q"]),
        (["version", "--help"], ["eventwire version"]),
    ],
)
def test_cli_help(args: list[str], expected: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout


def test_cli_version() -> None:
    result = run_cli("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"eventwire {eventwire.__version__}"


def test_cli_unknown_command_fails() -> None:
    result = run_cli("no-such-command")
    assert result.returncode != 0


# -- run_demo in-process ------------------------------------------------------------------


async def test_run_demo_returns_stats_for_every_subscription() -> None:
    buffer = io.StringIO()
    started = time.perf_counter()
    stats = await run_demo(Console(file=buffer, width=120, no_color=True))
    elapsed = time.perf_counter() - started
    n = len(DEFAULT_QUERIES)

    assert 3 <= n <= 4
    assert set(stats) == {
        "audit",
        "notifier",
        "research.handle_query",
        "email.send_summary",
        "analytics",
        "dlq-watcher",
    }
    analytics = stats["analytics"]
    # Three tries per query: two retries, then the dead-letter queue.
    assert (analytics.handled, analytics.failed) == (0, 3 * n)
    assert (analytics.retried, analytics.dead_lettered) == (2 * n, n)
    # Its mean time includes the 10 ms + 20 ms waits between tries.
    assert analytics.mean_handling_seconds >= 0.025
    for name in ("audit", "notifier", "research.handle_query", "email.send_summary"):
        assert stats[name].handled == n, name
        assert stats[name].failed == 0, name
    assert stats["dlq-watcher"].handled == n
    # drain() returned only once nothing was left anywhere.
    assert all(s.queued == 0 and s.in_flight == 0 and s.dropped == 0 for s in stats.values())
    assert elapsed < 2.0

    output = buffer.getvalue()
    assert "[AUDIT]     q1 user-101 asked: How many support tickets" in output
    assert len(re.findall(r"^\[DLQ\]", output, re.MULTILINE)) == n


async def test_run_demo_with_custom_queries() -> None:
    buffer = io.StringIO()
    queries = ["one", "two", "three", "four", "five"]
    stats = await run_demo(Console(file=buffer, width=120), queries=queries)
    assert stats["audit"].handled == 5
    assert stats["email.send_summary"].handled == 5
    assert stats["analytics"].dead_lettered == 5
    # More queries than demo users: the users repeat, in order.
    assert "[MAIN]      q5 user-101 asks: five" in buffer.getvalue()
