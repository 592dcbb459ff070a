"""The front tells the media worker about RFC 3389 comfort noise when the caller's SDP
offered it (and answers it), so the worker fills the waits with CN, else silence."""

from __future__ import annotations

from pathlib import Path

from pbx import messages as m
from pbx.sip.sdp import parse_sdp
from tests.calls.rig import PLAY, SDP, CoreRig, caller_invite, first_then

CN_SDP = SDP.replace(b"RTP/AVP 0 101", b"RTP/AVP 0 101 13") + b"a=rtpmap:13 CN/8000\r\n"


def test_offered_comfort_noise_reaches_the_worker(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    invite = caller_invite().replace(SDP, CN_SDP).replace(
        f"Content-Length: {len(SDP)}".encode(), f"Content-Length: {len(CN_SDP)}".encode())
    rig.answered(invite)
    [remote] = rig.of(m.MediaRemote)
    assert remote.cn_payload_type == 13
    answer = [r for r in rig.responses() if r.status == 200][0]
    assert parse_sdp(answer.body).media[0].formats == [0, 101, 13]


def test_no_comfort_noise_unless_offered(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.answered()
    [remote] = rig.of(m.MediaRemote)
    assert remote.cn_payload_type is None
    answer = [r for r in rig.responses() if r.status == 200][0]
    assert b"CN/8000" not in answer.body
