"""The media plane as the call layer sees it: RTP ports on media workers for legs, what
each leg's worker is told, and the workers' own messages.

Ports come without a round trip: every worker keeps a pool of pre-bound RTP ports and
announces it (MediaPorts, and in every heartbeat); `allocate` hands one out here
(`pbx.registry.MediaWorkerRegistry`), gives the leg the worker's declared address and
that port at once, tells the worker (MediaAllocate) and continues the leg's set-up
through `on_allocated(leg, ok)` in the same call (inbound: the answer; outbound: the
INVITE). The worker's next announcement confirms the port (its `allocate_seq` covers
the MediaAllocate and its `refused` does not name it); a refusal (MediaAllocated with an
error, or named by an announcement's `refused`), a MediaAllocated naming
another address or port, or no confirmation within MEDIA_ALLOCATE_TIMEOUT_S ends the
call (503, MediaAllocationFailed). `send_remote` tells the worker where to send RTP
after each offer/answer (the first of an inbound leg rides in its MediaAllocate);
`release` gives the port back. Workers declare their RTP address when
they join; one that declares another later is refused (DESIGN §6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pbx import messages as m
from pbx.calls.context import CallContext, ToMedia
from pbx.calls.state import Leg
from pbx.calls.timers import TimerKind
from pbx.policy import PartyKind
from pbx.sip import sdp
from pbx.sip.errors import SipError
from pbx.sip.uri import parse_uri

log = logging.getLogger("pbx.calls")

# A port handed out and not confirmed by its worker within this ends the leg's call.
MEDIA_ALLOCATE_TIMEOUT_S = 2.0


class MediaPlane:
    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        # Continues a leg's set-up once its port is allocated (True) or not (False).
        self.on_allocated: Callable[[Leg, bool], None] = lambda leg, ok: None
        # Ends the call of a leg whose port failed or whose worker is gone (the reason).
        self.on_failed: Callable[[Leg, str], None] = lambda leg, reason: None
        # While `allocate` continues a leg's set-up: the leg, where its MediaAllocate is
        # in the output, and that message.
        self._allocating: tuple[Leg, int, m.MediaAllocate] | None = None

    def allocate(self, leg: Leg, inband_dtmf: bool, worker: bytes | None = None) -> None:
        """A port for the leg from a worker's announced pool: on `worker` if given (alive,
        with a free port: a call's second leg), else on the least-loaded live worker with
        one. The answer comes through `on_allocated` before this returns."""
        ctx = self.ctx
        handout = ctx.media_workers.hand_out(leg.media_id, ctx.now, worker,
                                             shared=self.wants_shared(leg))
        if handout is None:
            self.on_allocated(leg, False)
            return
        media = leg.media
        media.worker, media.rtp_port = handout.worker, handout.port
        # Never an SDP answer pointing where the worker did not declare itself.
        media.rtp_ip = ctx.media_workers.address_of(handout.worker) or ""
        ctx.table.legs_by_media[leg.media_id] = leg
        ctx.timers.set(TimerKind.ALLOCATION, leg.media_id, ctx.now + MEDIA_ALLOCATE_TIMEOUT_S)
        allocate = m.MediaAllocate.model_construct(
            call_id=leg.media_id, rtp_port=handout.port, seq=handout.seq,
            inband_dtmf=inband_dtmf)
        # In the output now (whatever the set-up sends the worker next comes after it);
        # a `send_remote` during the set-up below rides in it (`_fold_remote`).
        outer, self._allocating = self._allocating, (leg, len(ctx.out), allocate)
        ctx.out.append(ToMedia(handout.worker, allocate))
        try:
            self.on_allocated(leg, True)
        finally:
            self._allocating = outer  # a call's b leg is allocated during a's set-up

    def wants_shared(self, leg: Leg) -> bool:
        """Whether the leg goes on its worker's shared RTP port (`[media] rtp_socket`):
        "auto" keeps a leg that looks NATed on a port of its own, since on the shared
        port only its SDP address can reach it (`workers.demux`)."""
        mode = self.ctx.settings.media.rtp_socket
        if mode == "per_leg":
            return False
        if mode == "shared":
            return not names_another_address(leg)
        return not looks_natted(leg)

    def may_move_to(self, leg: Leg, remote_ip: str) -> bool:
        """Whether a new offer in the dialog may point the leg's RTP at `remote_ip`: on
        the shared port an address in SDP claims the packets that come from it
        (`workers.demux`), so an anonymous caller may only name its own address there,
        or it could take another call's audio."""
        media = leg.media
        if (leg.outbound or leg.call.party.kind is not PartyKind.ANONYMOUS
                or media.worker is None or leg.source is None):
            return True
        if remote_ip in ("0.0.0.0", "::"):
            return True  # RFC 2543 hold: it claims nothing
        return (remote_ip == leg.source[0]
                or not self.ctx.media_workers.on_shared_port(media.worker, leg.media_id))

    def allocation_timeout(self, media_id: str) -> None:
        """The worker never confirmed the leg's port: its call ends."""
        leg = self.ctx.table.legs_by_media.get(media_id)
        if leg is None:
            return
        self.ctx.stats["media_allocations_failed"] += 1
        log.warning("media worker %.64r did not confirm port %d for %s: ending the call",
                    leg.media.worker, leg.media.rtp_port, media_id)
        self.on_failed(leg, "MediaAllocationFailed")

    def _allocated(self, identity: bytes, msg: m.MediaAllocated) -> None:
        ctx = self.ctx
        leg = ctx.table.legs_by_media.get(msg.call_id)
        if leg is None:
            return  # the leg ended: its MediaRelease followed the MediaAllocate
        media = leg.media
        if media.worker != identity:
            # Only the worker asked answers for a leg: another cannot end its call.
            ctx.stats["media_allocations_rejected"] += 1
            log.warning("media worker %.64r answered the allocation of %.64s asked of "
                        "%.64r: ignored", identity, msg.call_id, media.worker)
            return
        if msg.error is None and msg.rtp_ip == media.rtp_ip and msg.rtp_port == media.rtp_port:
            ctx.media_workers.confirm(identity, msg.rtp_port, msg.call_id)
            ctx.timers.cancel(TimerKind.ALLOCATION, msg.call_id)
            return
        if msg.error is None:  # the leg's SDP says another address or port
            ctx.stats["media_allocations_rejected"] += 1
            log.warning("media worker %.64r allocated %s at %.64r port %d, not the %.64r port "
                        "%d it was given: ending the call", identity, msg.call_id,
                        msg.rtp_ip, msg.rtp_port, media.rtp_ip, media.rtp_port)
        else:
            ctx.stats["media_allocations_failed"] += 1
            log.warning("media worker %.64r refused port %d for %s (%.200s): ending the call",
                        identity, media.rtp_port, msg.call_id, msg.error)
            self.forget(leg)  # it holds nothing to release
        self.on_failed(leg, "MediaAllocationFailed")

    def send_remote(self, leg: Leg) -> None:
        """Tell the leg's worker where to send RTP and how (after each offer/answer)."""
        media = leg.media
        n = media.negotiated
        if n is None or media.worker is None:
            return
        address, direction = (n.remote_ip, n.remote_port), n.direction
        if n.remote_ip in ("0.0.0.0", "::"):
            # RFC 2543 hold (RFC 3264 §8.4): nowhere to send; keep the last address and
            # stop sending until a new offer resumes.
            if media.address is None:
                return
            address, direction = media.address, "inactive"
        media.address = address
        # model_construct: values the SDP parser checked (no second validation pass).
        remote = m.MediaRemote.model_construct(
            call_id=leg.media_id, remote_ip=address[0], remote_port=address[1],
            payload_type=n.payload_type, codec=n.codec,  # type: ignore[arg-type]
            dtmf_payload_type=n.dtmf_payload_type, ptime_ms=n.ptime_ms,
            direction=direction,  # type: ignore[arg-type]
            cn_payload_type=n.cn_payload_type,
        )
        if not self._fold_remote(leg, remote):
            self.ctx.to_media(media.worker, remote)

    def _fold_remote(self, leg: Leg, remote: m.MediaRemote) -> bool:
        """Put the leg's first MediaRemote in its MediaAllocate, not yet sent (an inbound
        leg answered as its port is handed out): one message to the worker, not two."""
        pending = self._allocating
        if pending is None or pending[0] is not leg:
            return False
        _, index, allocate = pending
        command = self.ctx.out[index]
        assert isinstance(command, ToMedia) and command.msg is allocate
        folded = m.MediaAllocate.model_construct(
            call_id=allocate.call_id, rtp_port=allocate.rtp_port, seq=allocate.seq,
            inband_dtmf=allocate.inband_dtmf, remote=remote)
        self.ctx.out[index] = ToMedia(command.worker, folded)
        self._allocating = (leg, index, folded)
        return True

    def forget(self, leg: Leg) -> None:
        """Drop our record of the leg's port (and the load it counted) without a release."""
        if leg.media.worker is not None:
            self.ctx.media_workers.release(leg.media.worker, leg.media.rtp_port, leg.media_id)
        leg.media.worker = None
        self.ctx.timers.cancel(TimerKind.ALLOCATION, leg.media_id)
        if self.ctx.table.legs_by_media.pop(leg.media_id, None) is not None:
            self.ctx.table.release_call(leg.call)

    def release(self, leg: Leg) -> None:
        if leg.media.worker is None:
            return
        self.ctx.to_media(leg.media.worker, m.MediaRelease(call_id=leg.media_id))
        self.forget(leg)

    def command(self, leg: Leg, msg: Any, command: str) -> bool:
        """A session's command for the leg's worker; False when the leg has none. If the
        plane refuses it, the shell reports it (`CallCore.media_send_failed`)."""
        worker = leg.media.worker
        if worker is None:
            return False
        self.ctx.out.append(ToMedia(worker, msg, call_id=leg.call.call_id, command=command))
        return True

    # ---------------------------------------------------------------- worker messages

    def on_message(self, identity: bytes, msg: Any) -> Leg | None:
        """A media worker's message; a MediaEvent of a caller's leg is returned for the
        call layer to route (to the IVR session, or the call record)."""
        ctx = self.ctx
        if isinstance(msg, m.MediaReady | m.MediaHeartbeat):
            self._worker_declared(identity, msg)
            return None
        if not ctx.media_workers.seen(identity, ctx.now):
            log.info("message from unknown media worker %.64r; ignored until it says ready",
                     identity)
            return None
        if isinstance(msg, m.MediaPorts):
            self._announced(identity, msg)
        elif isinstance(msg, m.MediaAllocated):
            self._allocated(identity, msg)
        elif isinstance(msg, m.MediaEvent):
            leg = ctx.table.legs_by_media.get(msg.call_id)
            if leg is not None and leg.media.worker == identity and leg is leg.call.a:
                return leg
        elif isinstance(msg, m.MediaReleased):
            for released in msg.legs:
                log.debug("leg %s released: %d packets sent, %d received", released.call_id,
                          released.packets_sent, released.packets_received)
                ctx.metrics.media_released(ctx.stats, released)
                ctx.records.media_released(released.call_id, released.model_dump(
                    mode="json", exclude={"call_id"}))
        return None

    def _worker_declared(self, identity: bytes, msg: m.MediaReady | m.MediaHeartbeat) -> None:
        ctx = self.ctx
        declared = ctx.media_workers.address_of(identity)
        if not ctx.settings.media.rtp_ip_allowed(msg.rtp_ip) or declared not in (
                None, msg.rtp_ip):
            ctx.stats["media_workers_rejected"] += 1
            log.warning("media worker %.64r declares RTP address %.64r, which is %s: "
                        "refused", identity, msg.rtp_ip,
                        f"not the {declared!r} it declared first" if declared is not None
                        else "not [media] rtp_ip or in worker_rtp_ips")
            return
        if ctx.media_workers.ready(identity, msg.capacity, msg.calls, ctx.now, msg.rtp_ip):
            log.info("media worker %s joined (capacity %d, RTP address %s)",
                     msg.worker_id, msg.capacity, msg.rtp_ip)
        if isinstance(msg, m.MediaHeartbeat):  # counts since the worker's last heartbeat
            ctx.stats["rtp_foreign_dropped"] += msg.rtp_foreign_dropped
            ctx.stats["rtcp_foreign_dropped"] += msg.rtcp_foreign_dropped
            ctx.stats["dtmf_flood_dropped"] += msg.dtmf_flood_dropped
            self._announced(identity, msg)
            ctx.metrics.media_heartbeat(identity, msg)

    def _announced(self, identity: bytes, msg: m.MediaPorts | m.MediaHeartbeat) -> None:
        """A worker's free ports; the allocations its `allocate_seq` covers are confirmed
        (`PortPool.announce`): their deadlines go. Those its `refused` names (a refusal
        whose MediaAllocated was lost, or a MediaAllocate that never reached the worker)
        end their calls, as a refusal does."""
        ctx = self.ctx
        verdicts = ctx.media_workers.announce(identity, msg.ports, msg.allocate_seq,
                                              msg.shared_port, msg.refused)
        if verdicts is None:
            return
        for media_id in verdicts.confirmed:
            ctx.timers.cancel(TimerKind.ALLOCATION, media_id)
        for media_id in verdicts.refused:
            leg = ctx.table.legs_by_media.get(media_id)
            if leg is None:
                continue
            ctx.stats["media_allocations_failed"] += 1
            log.warning("media worker %.64r announced port %d for %s as refused or never "
                        "received: ending the call", identity, leg.media.rtp_port, media_id)
            self.forget(leg)  # it holds nothing to release
            self.on_failed(leg, "MediaAllocationFailed")

    def expire_workers(self) -> None:
        """Workers that stopped heartbeating: their legs' calls end (MediaWorkerLost)."""
        ctx = self.ctx
        for identity in ctx.media_workers.expire(ctx.now):
            log.warning("media worker %r stopped heartbeating: ending its calls", identity)
            ctx.stats["media_workers_lost"] += 1
            ctx.metrics.forget_worker(identity)
            for leg in [lg for lg in ctx.table.legs_by_media.values()
                        if lg.media.worker == identity]:
                self.forget(leg)
                self.on_failed(leg, "MediaWorkerLost")


def names_another_address(leg: Leg) -> bool:
    """An anonymous caller whose offer names another address than the one its INVITE
    came from: on the shared port that address would claim someone else's packets
    (`workers.demux`), so such a leg gets a port of its own even in "shared" mode.
    Trusted sources (SBCs, trunks, whose media address is often not their signalling
    one) and our authenticated extensions may name any address."""
    if leg.outbound or leg.call.party.kind is not PartyKind.ANONYMOUS:
        return False
    return looks_natted(leg)


def looks_natted(leg: Leg) -> bool:
    """Whether the leg's RTP may come from another address than its SDP will say (so it
    needs a port of its own): an inbound leg whose offer's c= address is not the address
    its INVITE came from (a phone behind NAT puts its private address in both its
    Contact and its SDP), or whose offer cannot be read; an outbound leg sent elsewhere
    than its Request-URI's host (a registered phone reached where its REGISTER came
    from, not at its Contact: behind NAT). The c= of an outbound leg's answer comes
    after the port is chosen, so the registration is all there is to judge by."""
    if leg.outbound:
        try:
            uri = parse_uri(leg.dialog.remote_target)
        except SipError:
            return True
        return (uri.host.strip("[]"), uri.port or 5060) != (leg.addr[0], leg.addr[1])
    if leg.invite is None or leg.source is None:
        return True
    try:
        offer = sdp.parse_sdp(leg.invite.body)
    except SipError:
        return True
    audio = next((md for md in offer.media if md.media == "audio" and md.port), None)
    if audio is None:
        return True
    connection = audio.connection or offer.connection
    return connection != leg.source[0]
