"""The base of every configuration section (`pbx.config`, `pbx.settings.*`)."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Section(BaseModel):
    """A TOML table of `config/pbx.toml`: an unknown key is an error (a typo must not
    leave a setting at its default silently), reported with the file and the key."""

    model_config = ConfigDict(extra="forbid")


def _networks(value: list[str]) -> list[str]:
    for net in value:
        ipaddress.ip_network(net, strict=False)  # ValueError names the bad entry
    return value


# A list of IP addresses or networks ("10.0.0.0/8", "192.0.2.7", "2001:db8::/32").
NetworkList = Annotated[list[str], AfterValidator(_networks)]
