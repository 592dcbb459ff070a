"""`pbx.calls.ivr.ivr_event`: the event sent to an executor, built without validating
the session state a second time (issue 9), is the event the validating constructor
makes: same fields, same fields set, same wire form, and the state is not copied."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pbx import messages as m
from pbx.calls.ivr import ivr_event
from pbx.config import IvrAppParams

INFO = m.CallInfo(call_id="c1", session_id="c1", caller="1001", callee="*99",
                  route_name="main", params=IvrAppParams(url="http://127.0.0.1:1/ivr"),
                  sip_headers={"From": "<sip:1001@h>"}, variables={"caller_trust": "trusted"})
STATE = orjson.dumps({f"key{i}": (i if i % 2 else {"nested": [i, "t\"é"]})
                      for i in range(40)}).decode()


@pytest.mark.parametrize("state", [None, "{}", STATE])
@pytest.mark.parametrize("item", [m.SessionStartInput(call=INFO),
                                  m.CallEndedInput(reason="Hangup"),
                                  m.MediaInput(event=m.DtmfDigit(digit="5"))])
def test_same_event_as_the_validating_constructor(state: str | None,
                                                  item: Any) -> None:
    built = ivr_event("c1", 7, state, item)
    validated = m.IvrEvent(session_id="c1", seq=7, state=state, input=item)
    assert built == validated
    assert built.model_fields_set == validated.model_fields_set
    assert built.model_dump(mode="json") == validated.model_dump(mode="json")
    assert built.model_dump_json() == validated.model_dump_json()
    assert m.IvrEvent.model_validate_json(built.model_dump_json()) == validated
    assert built.state is state  # handed on as it is, not copied


def test_input_is_still_validated() -> None:
    with pytest.raises(ValueError):
        ivr_event("c1", 1, None, {"type": "nonsense"})
