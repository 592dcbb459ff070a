"""The code cites the provider guide for its rules (`docs/decisions.md "Menu"`): every
page it names exists, and every section it names in quotes is a heading of that page."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_CITE = re.compile(r'docs/([\w-]+\.md)(?: "([^"]+)")?')
_HEADING = re.compile(r"^#+\s+(.*?)\s*(\{[^}]*\})?\s*$", re.MULTILINE)


def citations() -> list[tuple[str, str, str | None]]:
    found = []
    for top in ("pbx", "workers", "media", "examples"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for page, section in _CITE.findall(path.read_text(encoding="utf-8")):
                found.append((str(path.relative_to(ROOT)), page, section or None))
    return found


def headings(page: str) -> set[str]:
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    return {m.group(1).replace("`", "") for m in _HEADING.finditer(text)}


def test_the_code_cites_the_guide() -> None:
    cited = citations()
    assert len(cited) >= 20
    assert {page for _, page, _ in cited} >= {"decisions.md", "actions.md", "protocol.md"}


def test_every_citation_resolves() -> None:
    broken = []
    for source, page, section in citations():
        if not (ROOT / "docs" / page).is_file():
            broken.append(f"{source}: docs/{page} does not exist")
        elif section is not None and section not in headings(page):
            broken.append(f'{source}: docs/{page} has no heading "{section}"')
    assert not broken, "\n".join(broken)
