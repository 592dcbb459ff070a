"""pbx.routing: which route an incoming call takes."""

from __future__ import annotations

from typing import Any

from pbx.config import RouteSettings
from pbx.routing import CallAddress, Router

PARAMS = {"url": "http://127.0.0.1:8080/ivr/step"}


def route(name: str, priority: int = 100, **kw: Any) -> RouteSettings:
    return RouteSettings.model_validate({"name": name, "priority": priority, "app_params": PARAMS, **kw})


def addr(
    to_user: str = "100",
    to_host: str = "pbx.example",
    from_user: str = "alice",
    from_host: str = "client.example",
    request_uri_user: str | None = None,
) -> CallAddress:
    return CallAddress(
        to_user=to_user,
        to_host=to_host,
        from_user=from_user,
        from_host=from_host,
        request_uri_user=to_user if request_uri_user is None else request_uri_user,
    )


def test_priority_order() -> None:
    router = Router(
        [
            route("late", 50, match={"to.user": ".*"}),
            route("early", 5, match={"to.user": ".*"}),
            route("middle", 10, match={"to.user": ".*"}),
        ]
    )
    found = router.match(addr())
    assert found is not None and found.name == "early"


def test_file_order_breaks_ties() -> None:
    router = Router(
        [
            route("first", 10, match={"to.user": "^1"}),
            route("second", 10, match={"to.user": "^1"}),
            route("third", 10, match={"to.user": "^1"}),
        ]
    )
    found = router.match(addr("100"))
    assert found is not None and found.name == "first"


def test_lower_priority_value_wins_over_file_order() -> None:
    router = Router([route("a", 20, to_user="100"), route("b", 10, match={"to.user": "^100$"})])
    found = router.match(addr("100"))
    assert found is not None and found.name == "b"


def test_regex_match_each_field() -> None:
    cases = {
        "to.user": addr(to_user="sales"),
        "to.host": addr(to_host="sales"),
        "from.user": addr(from_user="sales"),
        "from.host": addr(from_host="sales"),
        "request_uri.user": addr(request_uri_user="sales"),
    }
    for field, hit in cases.items():
        router = Router([route("r", match={field: "^sales$"})])
        assert router.match(hit) is not None, field
        assert router.match(addr()) is None, field


def test_all_match_fields_must_hit() -> None:
    router = Router([route("r", match={"to.user": "^100$", "from.host": r"\.trusted$"})])
    assert router.match(addr("100", from_host="gw.trusted")) is not None
    assert router.match(addr("100", from_host="gw.other")) is None
    assert router.match(addr("101", from_host="gw.trusted")) is None


def test_regex_is_search_not_fullmatch() -> None:
    router = Router([route("r", match={"to.user": "99"})])
    assert router.match(addr("1990")) is not None


def test_default_star99_regex() -> None:
    router = Router([route("step", match={"to.user": r"^\*99$"})])
    assert router.match(addr("*99")) is not None
    assert router.match(addr("*990")) is None
    assert router.match(addr("99")) is None


def test_short_form_to_user_is_exact() -> None:
    router = Router([route("short", to_user="*99")])
    assert router.match(addr("*99")) is not None
    assert router.match(addr("*990")) is None
    assert router.match(addr("0*99")) is None
    assert router.match(addr("99")) is None


def test_short_form_is_not_a_regex() -> None:
    router = Router([route("short", to_user="1.3")])
    assert router.match(addr("1.3")) is not None
    assert router.match(addr("123")) is None


def test_short_form_combined_with_match() -> None:
    router = Router([route("r", to_user="*99", match={"from.user": "^10"})])
    assert router.match(addr("*99", from_user="1001")) is not None
    assert router.match(addr("*99", from_user="2001")) is None


def test_fall_through_to_next_route() -> None:
    router = Router([route("a", 1, to_user="*98"), route("b", 2, to_user="*99")])
    found = router.match(addr("*99"))
    assert found is not None and found.name == "b"


def test_no_match_gives_none() -> None:
    assert Router([route("a", to_user="*99")]).match(addr("123")) is None
    assert Router([]).match(addr()) is None
