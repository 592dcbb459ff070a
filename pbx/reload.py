"""Hot reload of the dial plan (SIGHUP or `pbx reload`): what may change in a running
system, and what needs a restart. Pure: settings in, a plan out; `pbx.calls.core`
and the IVR executor apply it.

Reloadable (the dial plan): `[users.*]`, `[[routes]]`, `[ivrs.*]`, `[queues.*]`,
`[skill_groups.*]`. Every other section wires the processes together or sizes them
(listen addresses, the planes, media, workers, limits, logging...) and takes effect
only at a restart: a reload that finds one of them changed applies the dial plan,
keeps running with the old values of the rest and names each key that needs a
restart.

The new file is validated whole first, exactly as at start-up (`pbx.config`); a file
that fails changes nothing. Calls in progress keep what they started with: a call
holds its route (and so its IVR's `app_params`) from set-up, a queue wait its queue's
settings (timeout, strategy, hold music); only later decisions use the new plan (the
next call's route, a transfer's target, a `jump_ivr`, the members a queue's next round
rings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pbx.config import Settings

# The Settings fields a reload applies.
RELOADABLE = ("users", "routes", "ivrs", "queues", "skill_groups")


@dataclass
class ReloadPlan:
    """What a validated new file changes against the running settings."""

    changed: list[str] = field(default_factory=list)  # reloadable sections that differ
    restart_needed: list[str] = field(default_factory=list)  # other keys that differ
    settings: Settings | None = None  # the running settings with the dial plan replaced

    def summary(self) -> str:
        parts = [f"reloaded {', '.join(self.changed)}" if self.changed else "dial plan unchanged"]
        if self.restart_needed:
            parts.append(f"needs a restart (kept the running values): "
                         f"{', '.join(self.restart_needed)}")
        return "; ".join(parts)


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two dumped sections."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(old.keys() | new.keys(), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [prefix]


def plan_reload(running: Settings, new: Settings) -> ReloadPlan:
    """Compare `new` (validated) with `running`: the dial plan sections to replace, the
    keys of other sections that need a restart, and the settings to run with."""
    plan = ReloadPlan()
    for name in Settings.model_fields:
        if name == "source_path":
            continue
        old_value = running.model_dump(include={name})[name]
        new_value = new.model_dump(include={name})[name]
        if old_value == new_value:
            continue
        if name in RELOADABLE:
            plan.changed.append(name)
        else:
            plan.restart_needed += _differences(old_value, new_value, name)
    plan.settings = running.model_copy(update={name: getattr(new, name) for name in RELOADABLE})
    plan.settings.source_path = running.source_path
    return plan
