"""The version is written once, in eventwire/__init__.py, and everything reports that one."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import eventwire

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / ("eventwire.exe" if os.name == "nt" else "eventwire")


def test_pyproject_reads_the_version_from_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"], "pyproject.toml states the version itself"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "eventwire/__init__.py"


def test_the_package_writes_its_version_once() -> None:
    source = (ROOT / "eventwire" / "__init__.py").read_text(encoding="utf-8")
    assert len(re.findall(r"^__version__ = ", source, re.MULTILINE)) == 1
    # A release number hatchling and pip accept, e.g. 0.1.0 or 1.2.0rc1.
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", eventwire.__version__)


def test_the_installed_metadata_has_the_package_version() -> None:
    # An editable install records the version at install time: reinstall after changing it.
    assert importlib.metadata.version("eventwire") == eventwire.__version__


@pytest.mark.parametrize("args", [["--version"], ["version"]])
def test_the_command_line_prints_the_package_version(args: list[str]) -> None:
    assert CONSOLE_SCRIPT.exists(), f"no console script at {CONSOLE_SCRIPT}: pip install -e ."
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"eventwire {eventwire.__version__}\n"
