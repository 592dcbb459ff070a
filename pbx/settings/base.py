"""The base of every configuration section (`pbx.config`, `pbx.settings.*`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A TOML table of `config/pbx.toml`: an unknown key is an error (a typo must not
    leave a setting at its default silently), reported with the file and the key."""

    model_config = ConfigDict(extra="forbid")
