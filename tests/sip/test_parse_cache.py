"""The remembered parses of short header values: the same answers, errors every time,
and long values (a stranger's padding) never kept."""

from __future__ import annotations

import pytest

from pbx.sip.errors import SipError
from pbx.sip.grammar import PARSE_CACHE_MAX_LEN, PARSE_CACHE_SIZE
from pbx.sip.uri import parse_name_addr, parse_uri
from pbx.sip.via import parse_via


def test_a_short_value_is_parsed_once_and_answered_alike() -> None:
    first = parse_name_addr("<sip:1001@10.0.0.1>;tag=abc")
    again = parse_name_addr("<sip:1001@10.0.0.1>;tag=abc")
    assert again is first and again.tag == "abc"
    assert parse_via("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-1").branch == "z9hG4bK-1"


def test_errors_are_raised_every_time() -> None:
    for _ in range(2):
        with pytest.raises(SipError):
            parse_uri("sip:")


def test_long_values_are_not_remembered() -> None:
    long_value = "<sip:1001@10.0.0.1>;x=" + "a" * PARSE_CACHE_MAX_LEN
    assert parse_name_addr(long_value) is not parse_name_addr(long_value)
    assert parse_name_addr(long_value) == parse_name_addr(long_value)


def test_the_cache_is_bounded() -> None:
    for n in range(PARSE_CACHE_SIZE + 10):
        parse_uri(f"sip:{n}@10.0.0.1")
    first = parse_uri("sip:0@10.0.0.1")  # evicted by then: parsed anew
    assert first == parse_uri("sip:0@10.0.0.1")
    assert parse_uri.__wrapped__("sip:0@10.0.0.1") == first  # type: ignore[attr-defined]
