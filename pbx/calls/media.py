"""The media plane as the call layer sees it: RTP ports on media workers for legs, what
each leg's worker is told, and the workers' own messages.

A leg's port comes from `allocate`; when it is there (or could not be had) the
`on_allocated(leg, ok)` hook continues the leg's set-up (inbound: the answer;
outbound: the INVITE). `send_remote` tells the worker where to send RTP after each
offer/answer; `release` gives the port back. Workers declare their RTP address when
they join; an allocation anywhere else is refused (DESIGN §6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pbx import messages as m
from pbx.calls.context import CallContext, ToMedia
from pbx.calls.state import Leg
from pbx.calls.timers import TimerKind

log = logging.getLogger("pbx.calls")

MEDIA_ALLOCATE_TIMEOUT_S = 2.0


class MediaPlane:
    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        # Continues a leg's set-up once its port is allocated (True) or not (False).
        self.on_allocated: Callable[[Leg, bool], None] = lambda leg, ok: None
        # Ends a call whose worker is gone: (call, reason, code).
        self.on_worker_lost: Callable[[Leg], None] = lambda leg: None

    def allocate(self, leg: Leg, inband_dtmf: bool, worker: bytes | None = None) -> None:
        """An RTP port for the leg: on `worker` if given (it must be alive), else on the
        least-loaded live worker. The answer comes through `on_allocated`."""
        ctx = self.ctx
        if worker is None:
            worker = ctx.media_workers.choose(ctx.now)
        elif not ctx.media_workers.assign(worker, ctx.now):
            worker = None
        if worker is None:
            self.on_allocated(leg, False)
            return
        leg.media.worker = worker
        ctx.table.legs_by_media[leg.media_id] = leg
        ctx.timers.set(TimerKind.ALLOCATION, leg.media_id, ctx.now + MEDIA_ALLOCATE_TIMEOUT_S)
        ctx.out.append(ToMedia(worker, m.MediaAllocate(call_id=leg.media_id,
                                                       inband_dtmf=inband_dtmf)))

    def allocation_timeout(self, media_id: str) -> None:
        leg = self.ctx.table.legs_by_media.get(media_id)
        if leg is None or leg.media.rtp_port:
            return
        log.warning("media worker %r did not allocate %s in time", leg.media.worker, media_id)
        self.release(leg)
        self.on_allocated(leg, False)

    def _allocated(self, identity: bytes, msg: m.MediaAllocated) -> None:
        ctx = self.ctx
        leg = ctx.table.legs_by_media.get(msg.call_id)
        if leg is not None and leg.media.worker != identity:
            # Only the worker asked answers for a leg (its address was checked).
            ctx.stats["media_allocations_rejected"] += 1
            log.warning("media worker %.64r answered the allocation of %.64s asked of "
                        "%.64r: ignored", identity, msg.call_id, leg.media.worker)
            return
        if leg is None or leg.media.rtp_port or (
                ctx.timers.deadline(TimerKind.ALLOCATION, msg.call_id) is None):
            if not msg.error:  # too late: nobody waits for this port any more
                ctx.to_media(identity, m.MediaRelease(call_id=msg.call_id))
            return
        ctx.timers.cancel(TimerKind.ALLOCATION, msg.call_id)
        if msg.error:
            log.warning("media worker %r: %s", identity, msg.error)
            self.forget(leg)
            self.on_allocated(leg, False)
            return
        declared = ctx.media_workers.address_of(identity)
        if msg.rtp_ip != declared or not 0 < msg.rtp_port < 65536:
            # Never an SDP answer pointing where the worker did not declare itself.
            ctx.stats["media_allocations_rejected"] += 1
            log.warning("media worker %.64r allocated %s at %.64r port %d, not at its "
                        "declared address %.64r: leg refused", identity, leg.media_id,
                        msg.rtp_ip, msg.rtp_port, declared)
            self.release(leg)
            self.on_allocated(leg, False)
            return
        leg.media.rtp_port, leg.media.rtp_ip = msg.rtp_port, msg.rtp_ip
        self.on_allocated(leg, True)

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
        self.ctx.to_media(media.worker, m.MediaRemote(
            call_id=leg.media_id, remote_ip=address[0], remote_port=address[1],
            payload_type=n.payload_type, codec=n.codec,  # type: ignore[arg-type]
            dtmf_payload_type=n.dtmf_payload_type, ptime_ms=n.ptime_ms,
            direction=direction,  # type: ignore[arg-type]
        ))

    def forget(self, leg: Leg) -> None:
        """Drop our record of the leg's port (and the load it counted) without a release."""
        if leg.media.worker is not None:
            self.ctx.media_workers.release(leg.media.worker)
        leg.media.worker = None
        self.ctx.timers.cancel(TimerKind.ALLOCATION, leg.media_id)
        self.ctx.table.legs_by_media.pop(leg.media_id, None)

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
        if isinstance(msg, m.MediaAllocated):
            self._allocated(identity, msg)
        elif isinstance(msg, m.MediaEvent):
            leg = ctx.table.legs_by_media.get(msg.call_id)
            if leg is not None and leg.media.worker == identity and leg is leg.call.a:
                return leg
        elif isinstance(msg, m.MediaReleased):
            log.debug("leg %s released: %d packets sent, %d received", msg.call_id,
                      msg.packets_sent, msg.packets_received)
            ctx.records.media_released(msg.call_id, msg.model_dump(
                mode="json", exclude={"v", "kind", "call_id"}))
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

    def expire_workers(self) -> None:
        """Workers that stopped heartbeating: their legs' calls end (MediaWorkerLost)."""
        ctx = self.ctx
        for identity in ctx.media_workers.expire(ctx.now):
            log.warning("media worker %r stopped heartbeating: ending its calls", identity)
            for leg in [lg for lg in ctx.table.legs_by_media.values()
                        if lg.media.worker == identity]:
                self.forget(leg)
                self.on_worker_lost(leg)
