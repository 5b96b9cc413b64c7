"""A directory laid out like the root of a clone after the README's set-up, and the environment
of a shell that has not activated the virtual environment: tests run the commands the README
and docs show there, exactly as written, without writing into the repository.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The environment running the tests: `.venv` itself under .ci/run and the README's set-up.
ENVIRONMENT = Path(sys.executable).parent.parent


def like_a_clone(directory: Path, *project_folders: str) -> Path:
    """`directory` with `.venv` (the environment running the tests) and the project's
    `project_folders` (e.g. ``examples``) linked in; what the commands write stays in it."""
    assert (ENVIRONMENT / "bin" / "eventwire").exists(), (
        f"no eventwire console script in {ENVIRONMENT}/bin: run the tests from the environment "
        "the README's set-up makes (.venv/bin/python -m pytest)"
    )
    (directory / ".venv").symlink_to(ENVIRONMENT, target_is_directory=True)
    for folder in project_folders:
        (directory / folder).symlink_to(ROOT / folder, target_is_directory=True)
    return directory


def fresh_shell() -> dict[str, str]:
    """The environment of a shell in which no virtual environment is activated."""
    tools = str(ENVIRONMENT / "bin")
    path = [folder for folder in os.environ.get("PATH", "").split(os.pathsep) if folder != tools]
    drop = {"VIRTUAL_ENV", "EVENTWIRE_URL"}  # EVENTWIRE_URL would change the default bus
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PATH": os.pathsep.join(path)}
