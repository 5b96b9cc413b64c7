"""The README's quick start must run exactly as shown."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README has no python block under 'Quick start'"
    return match.group(1)


def test_quick_start_runs_as_shown(tmp_path: Path) -> None:
    script = tmp_path / "quick_start.py"
    script.write_text(quick_start_code(), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "[AUDIT] User user-123 asked: What is the company revenue?" in lines
    assert "[NOTIFY] Processing query from session sess-456" in lines
    assert any(
        line.startswith("[EMAIL] Sending summary: Research result for: What is the company")
        for line in lines
    )
    # drain() covered the whole chain: the email line comes before "All events processed."
    email = next(i for i, line in enumerate(lines) if line.startswith("[EMAIL]"))
    assert email < lines.index("All events processed.")
    assert lines[-1] == "1 + 2 = 3"


def observing_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## See what the agents did", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README has no python block under 'See what the agents did'"
    return match.group(1)


def test_the_observing_example_prints_the_chain(tmp_path: Path) -> None:
    script = tmp_path / "observing.py"
    script.write_text(observing_code(), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"COLUMNS": "200", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^chain [0-9a-f-]{36}  \(2 events\)$", out, re.MULTILINE)
    assert re.search(r"✓ research  handled  1 attempt  \S+$", out, re.MULTILINE)
    assert re.search(
        r"└── ✓ email  handled  2 attempts  \S+  \(ConnectionError: smtp down\)$",
        out,
        re.MULTILINE,
    )
    assert out.splitlines()[-1] == "email: 1 handled, 1 retried"
