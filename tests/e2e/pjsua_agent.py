"""A headless pjsua2 phone (pjsip 2.15, PyPI `pjsua2-python`) driven over stdin/stdout,
run as its own process by tests/e2e/softphones.py so a test can always kill it.

Commands are JSON lines on stdin: `{"op": "register"}`, `{"op": "call", "uri": ...}`,
`{"op": "answer"}`, `{"op": "ring"}` (180), `{"op": "dtmf", "digits": "12", "method":
"rfc4733" | "info"}`, `{"op": "hold"}`, `{"op": "unhold"}`, `{"op": "hangup"}`,
`{"op": "quit"}`. Events are JSON lines on stdout: `reg` (status code), `incoming`,
`state` (call state name, last status code and reason), `media` (the call's audio
status). The sound card is pjsua's null device; on every active audio stream the phone
plays a continuous tone of `--tone` Hz and records what it receives to `--record`
(16-bit WAV at the conference bridge's rate), so the test checks audio by frequency.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from typing import Any

import pjsua2 as pj

STATE_NAMES = {
    pj.PJSIP_INV_STATE_NULL: "null", pj.PJSIP_INV_STATE_CALLING: "calling",
    pj.PJSIP_INV_STATE_INCOMING: "incoming", pj.PJSIP_INV_STATE_EARLY: "early",
    pj.PJSIP_INV_STATE_CONNECTING: "connecting", pj.PJSIP_INV_STATE_CONFIRMED: "confirmed",
    pj.PJSIP_INV_STATE_DISCONNECTED: "disconnected",
}
MEDIA_STATUS = {
    pj.PJSUA_CALL_MEDIA_NONE: "none", pj.PJSUA_CALL_MEDIA_ACTIVE: "active",
    pj.PJSUA_CALL_MEDIA_LOCAL_HOLD: "local_hold", pj.PJSUA_CALL_MEDIA_REMOTE_HOLD: "remote_hold",
    pj.PJSUA_CALL_MEDIA_ERROR: "error",
}


def emit(kind: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": kind, **fields}) + "\n")
    sys.stdout.flush()


class FlushedLog(pj.LogWriter):
    """pjsua's log written and flushed line by line (its own log file is buffered), so
    the test reads the SIP messages while the phone runs."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (open for the process)

    def write(self, entry: pj.LogEntry) -> None:
        self.file.write(entry.msg if entry.msg.endswith("\n") else entry.msg + "\n")


class Phone:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.call: PhoneCall | None = None
        self.tone = pj.ToneGenerator()
        self.recorder: pj.AudioMediaRecorder | None = None


class PhoneCall(pj.Call):
    def __init__(self, phone: Phone, account: pj.Account, call_id: int = pj.PJSUA_INVALID_ID
                 ) -> None:
        super().__init__(account, call_id)
        self.phone = phone

    def onCallState(self, prm: pj.OnCallStateParam) -> None:  # noqa: N802
        info = self.getInfo()
        emit("state", state=STATE_NAMES.get(info.state, str(info.state)),
             code=info.lastStatusCode, reason=info.lastReason)

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:  # noqa: N802
        info = self.getInfo()
        for index, media in enumerate(info.media):
            if media.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            status = MEDIA_STATUS.get(media.status, str(media.status))
            emit("media", status=status, dir=int(media.dir))
            if media.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            audio = self.getAudioMedia(index)
            phone = self.phone
            if phone.recorder is None:
                phone.recorder = pj.AudioMediaRecorder()
                phone.recorder.createRecorder(phone.args.record)
            audio.startTransmit(phone.recorder)
            phone.tone.startTransmit(audio)


class PhoneAccount(pj.Account):
    def __init__(self, phone: Phone) -> None:
        super().__init__()
        self.phone = phone

    def onRegState(self, prm: pj.OnRegStateParam) -> None:  # noqa: N802
        emit("reg", code=int(prm.code), reason=prm.reason)

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:  # noqa: N802
        call = PhoneCall(self.phone, self, prm.callId)
        self.phone.call = call
        emit("incoming", info=call.getInfo().remoteUri)


def read_commands(commands: queue.Queue[dict[str, Any]]) -> None:
    # A thread of its own that never calls pjsip: only the main thread does.
    for line in sys.stdin:
        if line.strip():
            commands.put(json.loads(line))
    commands.put({"op": "quit"})


def op_param(code: int = 0) -> pj.CallOpParam:
    prm = pj.CallOpParam(True)
    if code:
        prm.statusCode = code
    return prm


def run(args: argparse.Namespace) -> None:
    ep = pj.Endpoint()
    ep.libCreate()
    config = pj.EpConfig()
    config.uaConfig.threadCnt = 0
    config.uaConfig.mainThreadOnly = True
    config.uaConfig.userAgent = "pjsua2-interop-test"
    config.logConfig.level = 4
    config.logConfig.consoleLevel = 4  # the level the writer gets
    log_writer = FlushedLog(args.log)
    config.logConfig.writer = log_writer
    config.logConfig.msgLogging = True
    config.medConfig.noVad = True
    ep.libInit(config)
    transport = pj.TransportConfig()
    transport.boundAddress = args.ip
    transport.port = args.port
    kind = pj.PJSIP_TRANSPORT_TCP if args.transport == "tcp" else pj.PJSIP_TRANSPORT_UDP
    ep.transportCreate(kind, transport)
    ep.audDevManager().setNullDev()
    # PCMU and telephone-event only: the PBX's codecs (and one codec, no surprises).
    for codec in ep.codecEnum2():
        ep.codecSetPriority(codec.codecId, 255 if codec.codecId.startswith("PCMU/") else 0)
    ep.libStart()
    phone = Phone(args)
    tones = pj.ToneDescVector()
    tone = pj.ToneDesc()
    tone.freq1 = args.tone
    tone.freq2 = 0
    tone.on_msec = 30000
    tone.off_msec = 0
    tones.append(tone)
    phone.tone.createToneGenerator()
    phone.tone.play(tones, True)

    account_config = pj.AccountConfig()
    suffix = ";transport=tcp" if args.transport == "tcp" else ""
    account_config.idUri = f"sip:{args.user}@{args.registrar}"
    account_config.regConfig.registrarUri = f"sip:{args.registrar}{suffix}"
    account_config.regConfig.timeoutSec = 300
    account_config.regConfig.registerOnAdd = False
    account_config.sipConfig.authCreds.append(
        pj.AuthCredInfo("digest", "*", args.user, 0, args.password))
    if suffix:
        account_config.sipConfig.proxies.append(f"sip:{args.registrar}{suffix};lr")
    account_config.mediaConfig.transportConfig.boundAddress = args.ip
    # A free even port of the test's (pjsua's default, 4000, is shared by every phone).
    account_config.mediaConfig.transportConfig.port = args.rtp_port
    account_config.mediaConfig.transportConfig.portRange = 4
    account = PhoneAccount(phone)
    account.create(account_config)

    commands: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=read_commands, args=(commands,), daemon=True).start()
    emit("ready")
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:
        ep.libHandleEvents(20)
        try:
            command = commands.get_nowait()
        except queue.Empty:
            continue
        op = command["op"]
        try:
            if op == "quit":
                break
            if op == "register":
                account.setRegistration(True)
            elif op == "unregister":
                account.setRegistration(False)
            elif op == "call":
                phone.call = PhoneCall(phone, account)
                phone.call.makeCall(command["uri"] + suffix, op_param())
            elif op == "ring" and phone.call is not None:
                phone.call.answer(op_param(180))
            elif op == "answer" and phone.call is not None:
                phone.call.answer(op_param(200))
            elif op == "dtmf" and phone.call is not None:
                dtmf = pj.CallSendDtmfParam()
                dtmf.digits = command["digits"]
                dtmf.method = (pj.PJSUA_DTMF_METHOD_SIP_INFO if command.get("method") == "info"
                               else pj.PJSUA_DTMF_METHOD_RFC2833)
                dtmf.duration = 160
                phone.call.sendDtmf(dtmf)
            elif op == "hold" and phone.call is not None:
                phone.call.setHold(op_param())
            elif op == "unhold" and phone.call is not None:
                prm = op_param()
                prm.opt.flag = pj.PJSUA_CALL_UNHOLD
                phone.call.reinvite(prm)
            elif op == "hangup" and phone.call is not None:
                phone.call.hangup(op_param())
            emit("done", op=op)
        except pj.Error as e:
            emit("error", op=op, reason=e.info())
    # Leave quietly: pjsua's destructor order matters less than not hanging here.
    ep.hangupAllCalls()
    for _ in range(10):
        ep.libHandleEvents(20)
    if phone.recorder is not None:
        del phone.recorder  # closes (and finalises) the WAV file
    emit("bye")
    sys.stdout.flush()
    # No libDestroy: its teardown of the conference bridge can assert (a recorder or
    # tone port removed twice) and abort; the process ends here with all it opened.
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--registrar", required=True, help="host:port of the PBX")
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rtp-port", type=int, required=True)
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    parser.add_argument("--tone", type=int, default=1000, help="Hz this phone sends")
    parser.add_argument("--record", required=True, help="WAV file of what it receives")
    parser.add_argument("--log", required=True)
    parser.add_argument("--lifetime", type=float, default=120.0, help="seconds, at most")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
