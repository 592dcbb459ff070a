"""pbx-sim's expectations: whether a call's outcome holds what its scenario expects
(an event, an action, an end reason, a prompt, a text said, variables, an error)."""

from __future__ import annotations

from pbx.sim.runner import Out, Outcome
from pbx.sim.scenario import Call, Expectation, Options
from pbx.tts import TTS_UNAVAILABLE


def _contains(actual: object, expected: object) -> bool:
    """`expected` is a part of `actual`: dict keys recursively, scalars compared as text
    (YAML's 1 matches the protocol's "1")."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and _contains(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(
            _contains(a, e) for a, e in zip(actual, expected, strict=True)
        )
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected == actual
    if expected is None or actual is None:
        return expected is actual
    return str(actual) == str(expected)


def _bare(file: str) -> str:
    return file.removeprefix("sounds/")


def holds(expectation: Expectation, outcome: Outcome) -> bool:
    e = expectation
    if e.not_ is not None:
        return not holds(e.not_, outcome)
    if e.event is not None:
        return any(_contains(ev, e.event) for ev in outcome.events)
    if e.action is not None:
        return any(_contains(a, e.action) for a in outcome.actions)
    if e.end_reason is not None:
        return e.end_reason in outcome.end_reasons
    if e.played is not None:
        return _bare(e.played) in {_bare(f) for f in outcome.played}
    if e.said is not None:
        return any(e.said in text for text in outcome.said)
    if e.variables is not None:
        return _contains(outcome.variables, e.variables)
    if e.error is not None:
        return any(e.error in err for err in outcome.errors)
    return False


def check(call: Call, outcome: Outcome, out: Out, options: Options) -> None:
    """Check the call's expectations; errors the PBX recorded that no `error`
    expectation names are problems too, except those the simulation itself caused
    (`tts: false`: every text to speech fails, as on a PBX without it)."""
    for expectation in call.expect:
        ok = holds(expectation, outcome)
        out(f"  {'✓' if ok else '✗'} expect {expectation.describe()}")
        if not ok:
            outcome.failed_expectations.append(expectation.describe())
    wanted = [e.error for e in call.expect if e.error is not None]
    outcome.unexpected_errors = [
        f"PBX error: {err}" for err in outcome.errors if not any(w in err for w in wanted)
        # Counted as provider failures already:
        and not err.startswith(("provider failed", "invalid provider response"))
        and not (not options.tts and err.removeprefix("tts: ").startswith(TTS_UNAVAILABLE))
    ]
