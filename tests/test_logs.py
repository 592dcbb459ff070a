"""pbx.logs: the similar-lines budget asked before a costly line is built (`admits`)."""

from __future__ import annotations

import logging

import pytest

from pbx import logs
from pbx.logs import SimilarLinesFilter, admits

TEMPLATE = "call %s ended: %s"


def record(created: float, name: str = "pbx.calls") -> logging.LogRecord:
    rec = logging.LogRecord(name, logging.INFO, "events.py", 1, TEMPLATE, ("a", "{}"), None)
    rec.created = created
    return rec


def test_an_admitted_line_takes_from_the_budget_only_when_logged() -> None:
    similar = SimilarLinesFilter(rate=1.0, burst=2.0)
    for _ in range(5):  # asking takes nothing
        assert similar.admits("pbx.calls", logging.INFO, TEMPLATE, 100.0)
    assert similar.filter(record(100.0)) and similar.filter(record(100.0))
    assert similar.suppressed == 0


def test_a_refused_line_is_counted_as_left_out_and_the_next_written_one_says_so() -> None:
    similar = SimilarLinesFilter(rate=1.0, burst=1.0)
    assert similar.filter(record(100.0))
    assert not similar.admits("pbx.calls", logging.INFO, TEMPLATE, 100.2)  # not built
    assert not similar.filter(record(100.4))  # built and logged, then left out
    assert similar.suppressed == 2
    # Another template and another logger have budgets of their own.
    assert similar.admits("pbx.calls", logging.INFO, "other %s", 100.4)
    assert similar.admits("pbx.front", logging.INFO, TEMPLATE, 100.4)
    written = record(101.5)
    assert similar.filter(written)
    assert written.similar_suppressed == 2  # both, however each was left out


def test_admits_asks_the_level_and_the_filter_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("pbx.test_logs")
    monkeypatch.setattr(logger, "level", logging.WARNING)
    monkeypatch.setattr(logs, "_similar_lines", None)
    assert not admits(logger, logging.INFO, TEMPLATE)  # disabled level: nothing to build
    assert admits(logger, logging.WARNING, TEMPLATE)  # no budget configured
    spent = SimilarLinesFilter(rate=0.001, burst=1.0)
    spent.buckets[(logger.name, logging.WARNING, TEMPLATE)] = [0.0, 1e12, 0.0]
    monkeypatch.setattr(logs, "_similar_lines", spent)
    assert not admits(logger, logging.WARNING, TEMPLATE)
    assert spent.suppressed == 1
