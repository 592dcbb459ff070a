"""RFC 3261 §8.2.2-8.2.3, the UAS checks of an initial INVITE in the call core, in the
RFC's order (`CallCore._refused_by_uas_checks`, each header read only when its check is
reached since issue 9): Request-URI scheme (416), Require (420 with Unsupported), body
type (415 with Accept), Accept (406 with Warning); an INVITE that passes is answered."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.calls.rig import CALLER, PLAY, CoreRig, caller_invite, first_then


def _invite(extra: str = "", uri: str = "sip:*99@127.0.0.1:5060",
            content_type: str = "application/sdp") -> bytes:
    data = caller_invite(extra).replace(b"INVITE sip:*99@127.0.0.1:5060 ",
                                        f"INVITE {uri} ".encode(), 1)
    return data.replace(b"Content-Type: application/sdp",
                        f"Content-Type: {content_type}".encode(), 1)


@pytest.mark.parametrize(("invite", "status", "header", "value"), [
    (_invite(uri="mailto:someone@example.com"), 416, None, None),
    (_invite("Require: timer, 100rel, foo\r\n"), 420, "Unsupported", "100rel, foo"),
    (_invite("Require: timer\r\nRequire: precondition\r\n"), 420, "Unsupported",
     "precondition"),
    # The scheme is checked before Require, Require before the body type.
    (_invite("Require: foo\r\n", uri="mailto:x@example.com"), 416, None, None),
    (_invite("Require: foo\r\n", content_type="text/plain"), 420, "Unsupported", "foo"),
    (_invite(content_type="text/plain"), 415, "Accept", "application/sdp"),
    (_invite("Accept: text/html\r\n", content_type="text/plain"), 415, "Accept",
     "application/sdp"),
    (_invite("Accept: text/html, application/json;q=0.5\r\n"), 406, "Warning",
     '399 127.0.0.1 "only application/sdp bodies"'),
])
def test_refused_in_the_rfc_order(tmp_path: Path, invite: bytes, status: int,
                                  header: str | None, value: str | None) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.feed(invite, CALLER)
    assert rig.statuses() == [status]
    response = rig.responses()[-1]
    assert response.to_tag  # a final response of a UAS (§8.2.6.2)
    if header is not None:
        assert response.headers.get(header) == value
    assert not rig.core.ctx.table.calls


@pytest.mark.parametrize("extra", ["", "Require: timer\r\nSupported: timer\r\n",
                                   "Accept: application/sdp;level=1, text/html\r\n",
                                   "Accept: application/*\r\n", "Accept: */*\r\n"])
def test_accepted_when_every_check_passes(tmp_path: Path, extra: str) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.feed(_invite(extra + "Session-Expires: 1800\r\n" if "Require" in extra else extra),
             CALLER)
    assert rig.statuses()[-1] == 200
