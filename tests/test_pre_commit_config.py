"""The pre-commit hooks run the checks CI runs, with the project's own tools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def hooks() -> list[dict[str, Any]]:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    return [hook for repo in config["repos"] for hook in repo["hooks"]]


def ci_commands() -> set[str]:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip().startswith(".venv/bin/")}


def test_the_hooks_run_the_lint_and_type_checks_of_ci_as_written() -> None:
    ci_checks = {
        command
        for command in ci_commands()
        if command.startswith((".venv/bin/ruff", ".venv/bin/mypy"))
    }
    assert ci_checks, ".ci/run runs no ruff or mypy"
    entries = {hook["entry"] for hook in hooks()}
    assert entries == ci_checks, (
        f"hooks that CI does not run: {sorted(entries - ci_checks)}; "
        f"CI checks without a hook: {sorted(ci_checks - entries)}"
    )


def test_hooks_use_the_installed_tools_on_the_whole_tree() -> None:
    for hook in hooks():
        # system: the .venv's tools, whose versions CI installs; no hook brings its own.
        assert hook["language"] == "system", hook["id"]
        # The whole tree, as CI checks it: mypy needs the whole package to check any file.
        assert hook["pass_filenames"] is False, hook["id"]
