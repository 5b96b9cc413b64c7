"""The project's documents exist wherever the project points to them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A link to a file in Markdown: ](path) or ](path#anchor); URLs (scheme:) are left out.
MARKDOWN_LINK = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:)([^)#\s]*)(?:#[^)\s]*)?\)")
# A top-level project document by name, e.g. README.md, wherever code or docs name one.
PROJECT_DOCUMENT = re.compile(r"\b[A-Z][A-Z_]+\.md\b")


def project_files(pattern: str) -> Iterator[Path]:
    """The project's own files matching `pattern`: no hidden directory (.git, .venv, caches)."""
    for path in sorted(ROOT.rglob(pattern)):
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parent.parts):
            yield path


def test_every_markdown_link_to_a_file_resolves() -> None:
    broken = [
        f"{path.relative_to(ROOT)}: {target}"
        for path in project_files("*.md")
        for target in MARKDOWN_LINK.findall(path.read_text(encoding="utf-8"))
        if target and not (path.parent / target).exists()
    ]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_every_project_document_named_in_the_code_exists() -> None:
    sources = [ROOT / ".ci" / "run", *project_files("*.py"), *project_files("*.md")]
    missing = sorted(
        f"{path.relative_to(ROOT)}: {name}"
        for path in sources
        for name in set(PROJECT_DOCUMENT.findall(path.read_text(encoding="utf-8")))
        if not (ROOT / name).exists() and not (path.parent / name).exists()
    )
    assert not missing, "documents named but not in the repository:\n" + "\n".join(missing)
