"""The README's code and commands must run exactly as shown."""

from __future__ import annotations

import asyncio
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from eventwire.history import read_history
from tests.clone import ROOT, fresh_shell, like_a_clone

README = ROOT / "README.md"


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


# -- shell commands --------------------------------------------------------------------------

# The example command: `.venv/bin/python examples/<file>.py`, and the same with a file named.
EXAMPLE_COMMAND = re.compile(r"`(\.venv/bin/python examples/[^`]+\.py)`")


def commands_under(heading: str) -> list[str]:
    """The commands of the ```bash blocks in the README section titled `heading`."""
    section = README.read_text(encoding="utf-8").split(f"\n## {heading}\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return [
        line for block in blocks for line in block.splitlines() if line.strip() and line[0] != "#"
    ]


def run_as_written(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`command` as a fresh shell would run it (words, quotes, a trailing comment), in `cwd`."""
    return subprocess.run(
        shlex.split(command, comments=True),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=fresh_shell(),
    )


def test_the_example_command_runs_every_example_as_written(tmp_path: Path) -> None:
    commands = EXAMPLE_COMMAND.findall(README.read_text(encoding="utf-8"))
    templates = [command for command in commands if "<file>" in command]
    assert len(templates) == 1, "the README shows no `.venv/bin/python examples/<file>.py`"
    [template] = templates
    shown = [command for command in commands if "<file>" not in command]
    assert shown, "the README shows no example command with a file filled in"
    examples = sorted((ROOT / "examples").glob("*.py"))
    every = [template.replace("<file>.py", example.name) for example in examples]
    assert set(shown) <= set(every), f"commands naming no example: {set(shown) - set(every)}"
    clone = like_a_clone(tmp_path, "examples")
    for command in every:
        result = run_as_written(command, clone)
        assert result.returncode == 0, f"{command}:\n{result.stderr}"
        assert result.stdout.strip(), f"{command} printed nothing"


def test_the_publish_command_stores_the_event_as_written(tmp_path: Path) -> None:
    [command] = [c for c in commands_under("Running agents as a process") if " publish " in c]
    clone = like_a_clone(tmp_path)
    started = datetime.now(UTC) - timedelta(seconds=1)
    result = run_as_written(command, clone)
    assert result.returncode == 0, result.stderr
    event_id = result.stdout.strip()
    url = re.search(r"--url sqlite:///(\S+)", command)
    assert url, f"the README's publish command names no sqlite:/// URL: {command}"
    stored = asyncio.run(read_history(f"sqlite:///{clone / url.group(1)}", since=started))
    assert [(event.id, event.topic, event.metadata) for event in stored] == [
        (event_id, "user.query", {"user_id": "u-1"})
    ]


def test_the_run_command_runs_the_app_until_sigterm_as_written(tmp_path: Path) -> None:
    [command] = [c for c in commands_under("Running agents as a process") if " run " in c]
    process = subprocess.Popen(
        shlex.split(command, comments=True),
        cwd=like_a_clone(tmp_path, "examples"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=fresh_shell(),
    )
    output = process.stdout
    assert output is not None
    lines: queue.Queue[str] = queue.Queue()

    def read_lines() -> None:
        for line in output:
            lines.put(line)

    threading.Thread(target=read_lines, daemon=True).start()
    try:
        try:
            first = lines.get(timeout=30)  # the status line, once every subscription runs
        except queue.Empty:
            pytest.fail(f"{command}: no status line within 30 s")
        assert first.startswith("eventwire: running"), first
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, first + "".join(lines.queue)
    finally:
        process.kill()


# Shell lines of the README and docs that call a tool the README's set-up installs in .venv.
DOCUMENTS = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"```(bash|sh|console)\n(.*?)```", re.DOTALL)
# Inline: `python x.py`, `pip install y`, `pytest z` (`eventwire ...` inline is a synopsis).
INLINE_COMMAND = re.compile(r"`((?:python3?|pip|pytest) (?!install`)[^`]+)`")
TOOLS = {"python", "python3", "pip", "pytest", "eventwire"}


def shell_lines(text: str) -> list[str]:
    """The command lines of `text`'s shell blocks (a console block's are those after `$ `)."""
    lines = []
    for language, block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if language == "console":
                if line.startswith("$ "):
                    lines.append(line[2:])
            elif line.strip() and not line.lstrip().startswith("#"):
                lines.append(line)
    return lines


def test_commands_in_the_readme_and_docs_call_the_tools_of_the_virtual_environment() -> None:
    """`python examples/x.py` fails outside the virtual environment, `.venv/bin/python ...`
    works from the clone's root after the README's set-up (which `python3 -m venv` begins)."""
    outside = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for line in shell_lines(text):
            words = line.split()  # the command is the first word (a line may be in a string)
            if words[0] in TOOLS and words[:3] != ["python3", "-m", "venv"]:
                outside.append(f"{document.relative_to(ROOT)}: {line}")
        for command in INLINE_COMMAND.findall(text):
            outside.append(f"{document.relative_to(ROOT)}: `{command}`")
    assert not outside, "commands that fail outside .venv:\n" + "\n".join(outside)
