"""The provider guide builds: `mkdocs build --strict` (mkdocs.yml) fails on a broken
link or anchor and on any warning, so `make test` does too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(root / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=root, capture_output=True, text=True, timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_the_guide_builds_without_a_warning(tmp_path: Path) -> None:
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "quickstart" / "index.html").is_file()
    assert "WARNING" not in done.stderr, done.stderr


def _copy(tmp_path: Path) -> Path:
    """The guide and what it includes (examples/), to break on purpose."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copytree(ROOT / "examples", copy / "examples")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    return copy


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    page = copy / "docs" / "index.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md).\n")
    done = build(copy, tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-page.md" in done.stderr


def test_a_broken_anchor_fails_the_build(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    page = copy / "docs" / "index.md"
    page.write_text(page.read_text() + "\nSee [nothing](events.md#no-such-heading).\n")
    done = build(copy, tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-heading" in done.stderr
