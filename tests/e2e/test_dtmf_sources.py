"""Every DTMF source a caller can use reaches the provider once (issue 3 "Done when").

sipp is the caller; the provider answers `session_start` with `collect_dtmf`
(3 digits) and the collected digits with a second `collect_dtmf` of one digit, which
must time out: so the first `dtmf` event carries exactly the three keys pressed, in
order, and nothing is left over to be reported twice.

* RFC 4733: sipp's own telephone-event captures (`play_pcap_audio`);
* SIP INFO: `application/dtmf-relay` (`Signal=5`, `Duration=160`) in the dialog;
* in-band: the tones inside the caller's PCMU audio (`rtp_stream` of a raw µ-law file
  the test writes: sipp 3.6 plays the file's bytes as they are, a WAV header too);
* both at once: each key as RFC 4733 and as a tone at the same moment, reported once;
* in-band through loss: sipp replays a capture the test writes (`play_pcap_audio`), each
  tone missing one packet in its middle: still one report per key.

A PCMU caller transferred to a PCMA callee that answers telephone-event: a key the
caller presses after the bridge reaches the callee as RFC 4733 with the payload type
of the callee's answer (not the caller's).

sipp sends its captures (`play_pcap_audio`) and its `rtp_stream` audio from its own
media port (-mp), one source, as a phone does; the PBX latches strictly onto one
source per leg (`media.kernels.rtpbatch`), so a test that talks from a socket of its
own presses its keys from that socket too.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from media import g711
from tests.e2e.harness import (
    SCENARIOS,
    SIPP_PCAPS,
    LoopbackSniffer,
    PbxSystem,
    Reply,
    RtpEndpoint,
    free_port,
    media_address_from_sipp,
    sipp_messages,
    start_sipp,
    wait_until,
)
from tests.e2e.ivr_calls import send_dtmf

DIGITS = "159"  # sipp's captures of these have rising RTP timestamps (one event each)
PCAP_NAMES = {**{str(d): f"dtmf_2833_{d}.pcap" for d in range(10)},
              "*": "dtmf_2833_star.pcap", "#": "dtmf_2833_pound.pcap"}
DTMF_FREQS = {
    "1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "A": (697, 1633),
    "4": (770, 1209), "5": (770, 1336), "6": (770, 1477), "B": (770, 1633),
    "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "C": (852, 1633),
    "*": (941, 1209), "0": (941, 1336), "#": (941, 1477), "D": (941, 1633),
}
RATE = 8000


# ---------------------------------------------------------------- the wire


# ---------------------------------------------------------------- the provider


class CollectScript:
    """collect_dtmf of 3, then collect_dtmf of 1 that must time out, then hang up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps: dict[str, int] = {}

    def __call__(self, path: str, body: Any) -> Reply:
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return 200, b'{"status":"ok"}', 0.0
        session = body.get("session_id", "")
        with self.lock:
            step = self.steps.get(session, 0)
            self.steps[session] = step + 1
        if step == 0:
            action: dict[str, Any] = {"type": "collect_dtmf", "min_digits": 3,
                                      "max_digits": 3, "timeout_ms": 8000,
                                      "step_id": "collect-3"}
        elif step == 1:
            action = {"type": "collect_dtmf", "min_digits": 1, "max_digits": 1,
                      "timeout_ms": 1500, "step_id": "collect-stray"}
        else:
            action = {"type": "hangup", "step_id": "bye"}
        return 200, json.dumps(action).encode(), 0.0


def events_of(system: PbxSystem, caller: str) -> list[dict[str, Any]]:
    """The step events of the (latest) session whose caller is `caller`."""
    starts = [r for r in system.provider.seen("/ivr/step/start")
              if r.body.get("caller") == caller]
    assert starts, f"no session for caller {caller}"
    session_id = starts[-1].body["session_id"]
    return [r.body["event"] for r in system.provider.for_session(session_id)
            if r.path == "/ivr/step"]


# ---------------------------------------------------------------- the caller


def tone(digit: str, ms: int, dbfs: float = -10.0) -> list[float]:
    """A DTMF pair, both tones at `dbfs` - 3 dB each (the pair peaks near `dbfs`)."""
    low, high = DTMF_FREQS[digit]
    amp = 32767 * 10 ** (dbfs / 20) / 2
    return [amp * (math.sin(2 * math.pi * low * i / RATE) + math.sin(2 * math.pi * high * i / RATE))
            for i in range(RATE * ms // 1000)]


def silence(ms: int) -> list[float]:
    return [0.0] * (RATE * ms // 1000)


def write_ulaw(path: Path, samples: list[float]) -> Path:
    """Raw PCMU bytes (what sipp's rtp_stream sends as they are, 160 per packet)."""
    pcm = np.array([round(s) for s in samples], dtype=np.int16)
    codes = g711.encode(pcm, "PCMU")
    path.write_bytes(bytes(codes))
    return path


def caller_scenario(user: str, media: str, telephone_event: bool = True) -> str:
    """INVITE (PCMU [+ telephone-event 101], media at sipp's own port), ACK, `media`
    (scenario elements that send the keys), then wait for the PBX's BYE."""
    fmts = "0 101" if telephone_event else "0"
    te = ("      a=rtpmap:101 telephone-event/8000\n      a=fmtp:101 0-16\n"
          if telephone_event else "")
    party = f'From: "Caller" <sip:{user}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]'
    dialog = f"""\
      {party}
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]"""
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="dtmf caller">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      {party}
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:{user}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=caller 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP {fmts}
      a=rtpmap:0 PCMU/8000
{te}      a=ptime:20
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true"/>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
{dialog}
      CSeq: 1 ACK
      Contact: <sip:{user}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <pause milliseconds="700"/>
{media}
  <recv request="BYE" timeout="20000"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
  <pause milliseconds="500"/>
</scenario>
"""


def pcap_press(digit: str) -> str:
    return (f'  <nop><action><exec play_pcap_audio="{SIPP_PCAPS / PCAP_NAMES[digit]}"/>'
            "</action></nop>\n")


def info_press(user: str, digit: str, cseq: int) -> str:
    return f"""  <send retrans="500">
    <![CDATA[
      INFO sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{user}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: {cseq} INFO
      Contact: <sip:{user}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/dtmf-relay
      Content-Length: [len]

      Signal={digit}
      Duration=160
    ]]>
  </send>
  <recv response="200"/>
"""


def run_caller(system: PbxSystem, workdir: Path, user: str, scenario: str) -> Path:
    """Run the caller's scenario to its end; its sipp work directory."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "caller.xml"
    path.write_text(scenario)
    caller = start_sipp(f"caller-{user}", [
        "-sf", str(path), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-m", "1", "-l", "1",
    ], workdir / "sipp")
    try:
        assert caller.wait(40) == 0, caller.logs()
    finally:
        caller.stop()
    return caller.workdir


def assert_collected_once(system: PbxSystem, user: str) -> None:
    events = events_of(system, user)
    types = [e.get("type") for e in events]
    assert types == ["session_start", "dtmf", "dtmf_timeout"], events
    assert events[1].get("digit") == DIGITS, events
    wait_until(lambda: system.metrics()["pbx_calls"] == 0
               and system.metrics()["pbx_media_legs"] == 0, 5, "the PBX to be idle")


# ---------------------------------------------------------------- the tests


def test_rfc4733_digits_collected_once(system: PbxSystem, workdir: Path) -> None:
    system.provider.script = CollectScript()
    media = '  <pause milliseconds="500"/>\n'.join(pcap_press(d) for d in DIGITS)
    run_caller(system, workdir, "7101", caller_scenario("7101", media))
    assert_collected_once(system, "7101")


def test_sip_info_digits_collected_once(system: PbxSystem, workdir: Path) -> None:
    system.provider.script = CollectScript()
    media = '  <pause milliseconds="300"/>\n'.join(
        info_press("7102", d, cseq) for cseq, d in enumerate(DIGITS, start=2))
    run_caller(system, workdir, "7102", caller_scenario("7102", media, telephone_event=False))
    assert_collected_once(system, "7102")


def inband_stream(lead_ms: int, period_ms: int, on_ms: int = 100) -> list[float]:
    """Silence, then each digit of DIGITS as a tone every `period_ms`, then silence."""
    samples = silence(lead_ms)
    for d in DIGITS:
        samples += tone(d, on_ms) + silence(period_ms - on_ms)
    return samples + silence(400)


def test_inband_digits_collected_once(system: PbxSystem, workdir: Path) -> None:
    system.provider.script = CollectScript()
    # 100 ms on, 100 ms off, about -10 dBFS, inside a continuous PCMU stream.
    stream = write_ulaw(workdir / "tones.ulaw", inband_stream(400, 200))
    media = (f'  <nop><action><exec rtp_stream="{stream},1,0"/></action></nop>\n'
             '  <pause milliseconds="1500"/>\n')
    run_caller(system, workdir, "7103", caller_scenario("7103", media, telephone_event=False))
    assert_collected_once(system, "7103")


def write_rtp_pcap(path: Path, samples: list[float], lost: set[int]) -> Path:
    """`samples` as a PCMU RTP stream (20 ms packets, 20 ms apart) in a pcap that sipp's
    `play_pcap_audio` replays as it is, RTP header included; the packets whose index is
    in `lost` are left out (their sequence numbers and timestamps skipped, as after loss
    on the way). Ethernet, IPv4 and UDP headers carry placeholder addresses: sipp sends
    each payload from its media port to the PBX's."""
    pcm = np.array([round(x) for x in samples], dtype=np.int16)
    codes = bytes(g711.encode(pcm, "PCMU"))
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for k in range(len(codes) // 160):
        if k in lost:
            continue
        rtp = struct.pack("!BBHII", 0x80, 0, (1000 + k) & 0xFFFF, 160 * k, 0x5EED)
        udp = struct.pack("!HHHH", 40000, 6000, 8 + len(rtp) + 160, 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + 160, 0, 0, 64, 17, 0,
                         bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))  # fmt: skip
        frame = b"\0" * 12 + b"\x08\x00" + ip + udp + codes[160 * k : 160 * (k + 1)]
        usec = 20_000 * k
        out += struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000, len(frame), len(frame))
        out += frame
    path.write_bytes(bytes(out))
    return path


def test_inband_digits_through_lost_packets_collected_once(
    system: PbxSystem, workdir: Path
) -> None:
    """sipp replays a capture of the three keys in-band, 160 ms each, with one packet lost
    in the middle of every tone: each key still reaches the provider once (a lost packet
    is not a pause in the tone; before, each key came twice)."""
    system.provider.script = CollectScript()
    lead_ms, period_ms, on_ms = 400, 400, 160
    samples = inband_stream(lead_ms, period_ms, on_ms)
    lost = {(lead_ms + i * period_ms) // 20 + 3 for i in range(len(DIGITS))}  # 4th of 8
    capture = write_rtp_pcap(workdir / "lossy-tones.pcap", samples, lost)
    media = (f'  <nop><action><exec play_pcap_audio="{capture}"/></action></nop>\n'
             '  <pause milliseconds="600"/>\n')
    run_caller(system, workdir, "7105", caller_scenario("7105", media, telephone_event=False))
    assert_collected_once(system, "7105")


def test_same_key_rfc4733_and_inband_reported_once(system: PbxSystem, workdir: Path) -> None:
    system.provider.script = CollectScript()
    # One audio stream with a tone every second from 400 ms on; each RFC 4733 capture
    # starts with its tone (sipp's pauses keep time with its RTP stream within a packet
    # or two, well inside the press deduplication's overlap).
    lead_ms, period_ms = 400, 1000
    stream = write_ulaw(workdir / "tones.ulaw", inband_stream(lead_ms, period_ms))
    media = f'  <nop><action><exec rtp_stream="{stream},1,0"/></action></nop>\n'
    media += f'  <pause milliseconds="{lead_ms}"/>\n'
    media += f'  <pause milliseconds="{period_ms}"/>\n'.join(pcap_press(d) for d in DIGITS)
    media += '  <pause milliseconds="800"/>\n'
    wire = LoopbackSniffer(system.rtp_ports)
    try:
        sipp_dir = run_caller(system, workdir, "7104", caller_scenario("7104", media))
    finally:
        wire.close()
    assert_collected_once(system, "7104")
    # Both sources carried every key to the PBX: the events (101) and the tones (PCMU).
    pbx_media = media_address_from_sipp(sipp_dir)
    assert pbx_media is not None
    to_pbx = [p for dst, p in list(wire.packets) if dst == pbx_media]
    event_ends = {p.payload[0]: p.at for p in to_pbx
                  if p.payload_type == 101 and p.payload[1] & 0x80}
    assert sorted(event_ends) == sorted(int(d) for d in DIGITS), event_ends
    audio = [p for p in to_pbx if p.payload_type == 0]
    loud = [p for p in audio if _rms(p.payload) > 1000]
    tone_starts = [p.at for i, p in enumerate(loud) if i == 0 or p.at - loud[i - 1].at > 0.3]
    assert len(tone_starts) == len(DIGITS), f"{len(loud)} tone packets of {len(audio)}"
    # The same moment: each capture's end packet (140 ms after its start) falls just
    # after its tone began.
    for digit, start in zip(DIGITS, tone_starts, strict=True):
        assert 0.0 < event_ends[int(digit)] - start < 0.3, (digit, event_ends, tone_starts)


# ---------------------------------------------------------------- transfer + DTMF


TRANSFER_MENU = {
    "type": "dtmf_menu",
    "greeting": "sounds/menu.wav",
    "timeout_ms": 8000,
    "entries": {"1": {"type": "transfer", "target": "2001"}},
    "step_id": "menu-transfer",
}
CALLEE_DTMF_PT = 96  # not the caller's 101: the bridge must rewrite it


def transfer_script(path: str, body: Any) -> Reply:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    if (body.get("event") or {}).get("type") == "session_start":
        return 200, json.dumps(TRANSFER_MENU).encode(), 0.0
    return 200, json.dumps({"type": "hangup"}).encode(), 0.0


def sdp_audio_port(message: str) -> int | None:
    for line in message.splitlines():
        if line.startswith("m=audio "):
            return int(line.split()[1])
    return None


def test_digit_after_transfer_reaches_pcma_callee_as_rfc4733(
        system: PbxSystem, workdir: Path) -> None:
    system.provider.script = transfer_script
    wire = LoopbackSniffer(system.rtp_ports)
    caller_rtp = RtpEndpoint()
    callee_media = free_port(even=True)
    callee = start_sipp("callee-2001", [
        "-sf", str(SCENARIOS / "uas_answer_pcma_dtmf.xml"), "-s", "2001",
        "-i", "127.0.0.1", "-p", str(system.extension_ports["2001"]),
        "-mi", "127.0.0.1", "-mp", str(callee_media), "-rtp_echo", "-m", "1",
        "-key", "dtmf_pt", str(CALLEE_DTMF_PT),
    ], workdir / "callee")
    caller = start_sipp("caller", [
        "-sf", str(SCENARIOS / "uac_transfer_then_dtmf.xml"), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-key", "rtp_port", str(caller_rtp.port),
        "-m", "1", "-l", "1",
    ], workdir / "caller")
    try:
        # sipp presses 1 ~1.5 s in (transfer); once bridged the test's socket (the SDP
        # address, which takes the latch from sipp's media port) talks and presses 5.
        wait_until(lambda: "ACK" in sipp_messages(callee.workdir).split("INVITE sip:", 1)[-1],
                   15, "the callee to answer")
        invite = sipp_messages(callee.workdir).split("INVITE sip:", 1)[-1]
        b_port = sdp_audio_port(invite)
        assert b_port is not None, invite
        b_leg = ("127.0.0.1", b_port)
        media_addr = wait_until(lambda: media_address_from_sipp(caller.workdir), 5,
                                "the caller's SDP answer")
        # Audio both ways across the codecs: the caller's PCMU goes to the callee as
        # PCMA, and the callee's echo comes back to the caller as PCMU.
        sent = bytes(g711.encode(_square(), "PCMU"))
        for _ in range(25):
            caller_rtp.send(media_addr, sent)
            threading.Event().wait(0.02)
        wait_until(lambda: len(wire.sent_by(b_leg, 8)) >= 10, 5,
                   "PCMA from the PBX to the callee")
        send_dtmf(caller_rtp, media_addr, "5")

        def events_to_callee() -> list[Any]:
            return [p for dst, p in list(wire.packets)
                    if p.src == b_leg and dst[1] == callee_media
                    and p.payload_type == CALLEE_DTMF_PT]

        events = wait_until(lambda: [p for p in events_to_callee()
                                     if p.payload and p.payload[0] == 5
                                     and p.payload[1] & 0x80], 15,
                            "the caller's 5 as RFC 4733 at the callee")
        assert events, events
        stray = [p for dst, p in list(wire.packets)
                 if p.src == b_leg and p.payload_type == 101]
        assert not stray, f"{len(stray)} packets with the caller's payload type 101"
        assert all(p.payload[0] == 5 for p in events_to_callee()), \
            "only the digit pressed after the bridge goes to the callee"
        starts = [p for p in events_to_callee() if p.marker]
        assert len(starts) == 1, f"{len(starts)} event starts (marker) for one key"
        assert caller.wait(30) == 0, caller.logs()
        assert callee.wait(15) == 0, callee.logs()
    finally:
        caller.stop()
        callee.stop()
        caller_rtp.close()
        wire.close()
    wait_until(lambda: system.metrics()["pbx_calls"] == 0
               and system.metrics()["pbx_media_legs"] == 0, 5, "the PBX to be idle")


def _rms(ulaw: bytes) -> float:
    pcm = g711.decode(np.frombuffer(ulaw, dtype=np.uint8), "PCMU").astype(np.float64)
    return float(np.sqrt(np.mean(pcm * pcm))) if pcm.size else 0.0


def _square() -> np.ndarray:
    return np.array([6000 if (i // 10) % 2 else -6000 for i in range(160)], dtype=np.int16)
