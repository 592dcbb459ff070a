"""Route selection for incoming calls (rustpbx-compatible `[[routes]]`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pbx.config import RouteSettings


@dataclass(frozen=True)
class CallAddress:
    """The parts of an INVITE that routes match on."""

    to_user: str
    to_host: str
    from_user: str
    from_host: str
    request_uri_user: str

    def field(self, name: str) -> str:
        return {
            "to.user": self.to_user,
            "to.host": self.to_host,
            "from.user": self.from_user,
            "from.host": self.from_host,
            "request_uri.user": self.request_uri_user,
        }[name]


class Router:
    def __init__(self, routes: list[RouteSettings]) -> None:
        ordered = sorted(routes, key=lambda r: r.priority)  # stable: file order breaks ties
        self._routes = [
            (route, {k: re.compile(p) for k, p in route.match.items()}) for route in ordered
        ]

    def match(self, address: CallAddress) -> RouteSettings | None:
        for route, patterns in self._routes:
            if route.to_user is not None and address.to_user != route.to_user:
                continue
            if all(p.search(address.field(k)) for k, p in patterns.items()):
                return route
        return None
