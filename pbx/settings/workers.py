"""Worker settings: `[media]` (the media workers, and what the front allows them) and
`[ivr]` (the IVR executors). Part of `Settings` (`pbx.config`).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pbx.settings.base import NetworkList, Section


def _is_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


class MediaSettings(Section):
    # The RTP address of this host's media workers (bound, and put in SDP answers).
    rtp_ip: str = "127.0.0.1"
    # Front: RTP addresses (or networks) media workers on other hosts may declare, in
    # addition to `rtp_ip`. A worker declaring anything else is refused, and an
    # allocation whose address differs from its worker's declared one fails the leg.
    worker_rtp_ips: NetworkList = Field(default_factory=list)
    rtp_ports: str = "20000-29999"
    sounds_dir: str = "sounds"
    recordings_dir: str = "recordings"
    voicemail_dir: str = "voicemail"
    # Calls one worker accepts before the front stops choosing it.
    capacity: int = Field(default=2000, gt=0)
    # RTP/RTCP port pairs each worker keeps bound ahead of calls and announces to the
    # front, which hands them out without asking (fewer while capacity or the port
    # range leaves less room). Enough for the calls that arrive between two ticks.
    port_pool: int = Field(default=64, gt=0, le=4096)
    # Which legs share one RTP port per worker (and its RTCP port + 1), told apart by
    # their packets' source address, and which get a port of their own. "per_leg": every
    # leg its own. "shared": every leg on its worker's shared port (fewer system calls
    # per packet: batched sends and receives across legs), for peers whose SDP address is
    # where their RTP comes from (trunks, SBCs, phones not behind NAT): a leg's latch can
    # never move to an address its SDP did not give. "auto": shared unless the leg looks
    # NATed (its SDP c= address is not the address its SIP came from; a registered
    # contact reached at another address than its Contact), which get their own port.
    rtp_socket: Literal["per_leg", "shared", "auto"] = "per_leg"
    # The shared port (even; RTCP on port + 1) when rtp_socket is not per_leg; 0: each
    # worker picks a free pair from rtp_ports (a fixed port suits one worker per host).
    shared_port: int = Field(default=0, ge=0, le=65534)
    # Workers run as SCHED_BATCH threads: a packet's wake-up never preempts (README).
    sched_batch: bool = True
    heartbeat_ms: int = Field(default=500, gt=0)
    # A worker not heard from for this long is dropped (DESIGN: within 2 s).
    expiry_ms: int = Field(default=1500, gt=0)

    @field_validator("rtp_ip")
    @classmethod
    def _check_rtp_ip(cls, v: str) -> str:
        # Bound and put in SDP: a typo ("10.0.0.l") left every worker without a port.
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"must be an IP address, got {v!r}") from None
        return v

    @model_validator(mode="after")
    def _expiry_after_heartbeats(self) -> MediaSettings:
        _check_expiry(self.heartbeat_ms, self.expiry_ms)
        return self

    @field_validator("rtp_ports")
    @classmethod
    def _check_range(cls, v: str) -> str:
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", v)
        if not m:
            raise ValueError(f"must be 'low-high', got {v!r}")
        low, high = int(m.group(1)), int(m.group(2))
        if not (1024 <= low < high < 65536):
            raise ValueError(f"range {low}-{high} must satisfy 1024 <= low < high < 65536")
        return v

    @property
    def port_range(self) -> tuple[int, int]:
        low, high = (int(p) for p in self.rtp_ports.split("-"))
        return low, high

    @field_validator("shared_port")
    @classmethod
    def _check_shared_port(cls, v: int) -> int:
        if v and (v < 1024 or v % 2):
            raise ValueError(f"must be 0 or an even port >= 1024 (RTCP takes the one above), "
                             f"got {v}")
        return v

    def rtp_ip_allowed(self, address: str) -> bool:
        """Whether a media worker may declare `address` as its RTP address."""
        if address == self.rtp_ip:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net, strict=False)
                   for net in [self.rtp_ip, *self.worker_rtp_ips] if _is_network(net))


class IvrSettings(Section):
    heartbeat_ms: int = Field(default=500, gt=0)
    expiry_ms: int = Field(default=3000, gt=0)
    # Sessions one executor runs at once before the front prefers another.
    capacity: int = Field(default=1000, gt=0)

    @model_validator(mode="after")
    def _expiry_after_heartbeats(self) -> IvrSettings:
        _check_expiry(self.heartbeat_ms, self.expiry_ms)
        return self


def _check_expiry(heartbeat_ms: int, expiry_ms: int) -> None:
    """A process is dropped after expiry_ms without a heartbeat: with one heartbeat or
    less in that time, every worker would be dropped between two of its own."""
    if expiry_ms < 2 * heartbeat_ms:
        raise ValueError(f"expiry_ms ({expiry_ms}) must be at least twice heartbeat_ms "
                         f"({heartbeat_ms})")
