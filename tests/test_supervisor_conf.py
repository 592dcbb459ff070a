"""pbx.supervisor_conf: the generated supervisord include."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from pbx.supervisor_conf import main, render


def test_render_has_numprocs() -> None:
    text = render(media_workers=4, executors=3)
    assert "numprocs=4" in text
    assert "numprocs=3" in text
    # supervisord's own %(...)s expansions must survive str.format untouched.
    assert "%(process_num)02d" in text and "%(here)s" in text


def test_render_sections_parse() -> None:
    parser = configparser.RawConfigParser()
    parser.read_string(render(media_workers=2, executors=1))
    assert parser.get("program:media", "numprocs") == "2"
    assert parser.get("program:ivr", "numprocs") == "1"
    assert parser.get("program:media", "command").endswith("pbx-media")
    assert parser.get("program:ivr", "command").endswith("pbx-ivr")


def test_main_writes_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run" / "workers.conf"
    assert main(["--media-workers", "5", "--executors", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == render(5, 2)
    assert str(out) in capsys.readouterr().out


def test_main_default_media_workers_is_cpu_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 7)
    out = tmp_path / "w.conf"
    # argparse defaults are evaluated when main() builds the parser.
    assert main(["--out", str(out)]) == 0
    assert "numprocs=7" in out.read_text()


@pytest.mark.parametrize(
    "args",
    [["--media-workers", "0"], ["--executors", "0"], ["--media-workers", "-1", "--executors", "-2"]],
)
def test_counts_below_one_rejected(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "w.conf"
    assert main([*args, "--out", str(out)]) == 2
    assert not out.exists()
    assert "at least 1" in capsys.readouterr().err
