"""The full forms of three durable-run tests (issue 12), whose short forms run in the suite:

- 200 runs of the six-step agent (three model steps, a gather, a wait, an effect) in worker
  processes SIGKILLed at random points and restarted (tests/conformance/test_durable_runs.py);
- 10,000 runs parked at once, the heap measured, then all resolved after a restart
  (tests/conformance/test_pending_waits.py);
- 1,000 token streams at once, each reader cut mid-stream and resuming from its last
  sequence number (tests/test_models.py).

Usage (from the repository root; Redis and NATS JetStream on localhost)::

    .venv/bin/python bench/durable_crash.py [--runs 200] [--waits 10000] [--streams 1000]
        [--backends sqlite,redis,nats] [--markdown FILE]

Each test is run through pytest with its size in the environment; the figures the tests
write are printed as tables (and appended to FILE with --markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


def run_tests(test: str, backends: list[str], env: dict[str, str]) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.jsonl"
        selection = " or ".join(backends)
        completed = subprocess.run(
            [
                *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test),
                *("-k", selection, "--timeout", "3600"),
            ],
            cwd=REPO_DIR,
            env={
                **os.environ,
                **env,
                "EVENTWIRE_CRASH_REPORT": str(report),
                "EVENTWIRE_PENDING_REPORT": str(report),
                "EVENTWIRE_STREAMS_REPORT": str(report),
            },
            check=False,
        )
        if completed.returncode != 0:
            raise SystemExit(f"{test} failed (exit {completed.returncode})")
        return [json.loads(line) for line in report.read_text().splitlines()]


def table(rows: list[dict[str, object]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--waits", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=1_000)
    parser.add_argument("--backends", default="sqlite,redis,nats")
    parser.add_argument("--markdown", type=Path)
    options = parser.parse_args()
    backends = options.backends.split(",")
    crashes = run_tests(
        "tests/conformance/test_durable_runs.py",
        backends,
        {"EVENTWIRE_CRASH_RUNS": str(options.runs)},
    )
    pending = run_tests(
        "tests/conformance/test_pending_waits.py",
        backends,
        {"EVENTWIRE_PENDING_WAITS": str(options.waits)},
    )
    streams = run_tests(
        "tests/test_models.py::test_stream_readers_resume_from_a_sequence_number_with_no_gap_or_duplicate",
        backends,
        {"EVENTWIRE_STREAMS": str(options.streams)},
    )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    text = (
        f"Machine: {machine}.\n\n"
        f"Runs killed at random points ({options.runs} per backend):\n\n{table(crashes)}\n\n"
        f"Runs parked at once ({options.waits} per backend):\n\n{table(pending)}\n\n"
        f"Streams read with a reconnect ({options.streams} per backend):\n\n{table(streams)}\n"
    )
    print(text)
    if options.markdown:
        with options.markdown.open("a") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
