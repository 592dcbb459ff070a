"""Configuration: `config/pbx.toml` (or `$PBX_CONFIG`), validated with pydantic.

Every program loads the same file through `load_config()`. A bad file stops
start-up with `ConfigError`, whose text names the file, the key and the reason.
Relative paths are relative to the current directory, which is the project root
under supervisord (DESIGN §2 "paths").
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG_PATH = "config/pbx.toml"
CONFIG_ENV = "PBX_CONFIG"


class ConfigError(Exception):
    """A configuration file that cannot be used; the text says file, key and reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """`"127.0.0.1:5060"` or `"[::1]:5060"` → (host, port)."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value.strip())
    if not m:
        raise ValueError(f"{what} must be 'host:port', got {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"{what} port {port} is out of range")
    return host, port


class SipSettings(_Section):
    listen: str = "127.0.0.1:5060"
    # Address put in Via/Contact/SDP-facing headers; defaults to the listen address.
    advertised: str | None = None
    # How long an outbound leg (transfer) may ring before it is given up.
    ring_timeout_ms: int = Field(default=30000, gt=0)
    # Digest authentication (REGISTER). Nonces are HMACs under `auth_secret`, so every
    # front sharing the secret accepts them; unset, a random secret per start is used.
    realm: str = "pbx"
    auth_secret: str | None = None
    # Challenges offered, in order. Many UAs (sipp, older phones) only answer the first
    # challenge and only know MD5, so MD5 leads by default; list "SHA-256" first (or
    # alone) where every UA supports RFC 8760.
    digest_algorithms: list[Literal["MD5", "SHA-256"]] = Field(
        default=["MD5", "SHA-256"], min_length=1
    )
    # TCP (RFC 3261 §18): connections with no traffic for this long are closed.
    tcp_idle_s: float = Field(default=120.0, gt=0)
    # Largest message accepted on TCP (UDP datagrams cannot exceed 64 KB anyway).
    max_message_bytes: int = Field(default=65536, ge=1024, le=1048576)
    # Per-source-IP token bucket on incoming messages; excess is dropped (0 disables).
    rate_limit_per_s: float = Field(default=200.0, ge=0)
    rate_limit_burst: float = Field(default=400.0, ge=1)
    # Sources (IP networks) the limit does not apply to: trunks, load generators.
    rate_limit_exempt: list[str] = Field(default_factory=list)

    @field_validator("rate_limit_exempt")
    @classmethod
    def _check_networks(cls, v: list[str]) -> list[str]:
        for net in v:
            ipaddress.ip_network(net, strict=False)
        return v

    @field_validator("listen", "advertised")
    @classmethod
    def _check_addr(cls, v: str | None) -> str | None:
        if v is not None:
            parse_host_port(v, "address")
        return v

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen, "listen")

    @property
    def advertised_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.advertised or self.listen, "advertised")


class MediaSettings(_Section):
    rtp_ip: str = "127.0.0.1"
    rtp_ports: str = "20000-29999"
    sounds_dir: str = "sounds"
    recordings_dir: str = "recordings"
    voicemail_dir: str = "voicemail"
    # Calls one worker accepts before the front stops choosing it.
    capacity: int = Field(default=2000, gt=0)
    heartbeat_ms: int = Field(default=500, gt=0)
    # A worker not heard from for this long is dropped (DESIGN: within 2 s).
    expiry_ms: int = Field(default=1500, gt=0)

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


class IvrSettings(_Section):
    heartbeat_ms: int = Field(default=500, gt=0)
    expiry_ms: int = Field(default=3000, gt=0)
    # Sessions one executor runs at once before the front prefers another.
    capacity: int = Field(default=1000, gt=0)


class ZmqSettings(_Section):
    media_endpoint: str = "tcp://127.0.0.1:5570"
    ivr_endpoint: str = "tcp://127.0.0.1:5571"
    events_endpoint: str = "tcp://127.0.0.1:5572"


class AdminSettings(_Section):
    listen: str = "127.0.0.1:8088"

    @field_validator("listen")
    @classmethod
    def _check_addr(cls, v: str) -> str:
        parse_host_port(v, "listen")
        return v


class LoggingSettings(_Section):
    dir: str = "logs"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class RetrySettings(BaseModel):
    """`app_params.retry` of a step-mode IVR route (spec §9)."""

    model_config = ConfigDict(extra="ignore")
    max_retries: int = Field(default=3, ge=0)
    timeout_ms: int = Field(default=1000, gt=0)
    fallback: dict[str, Any] = Field(
        default_factory=lambda: {"type": "hangup", "prompt": "sounds/error.wav"}
    )


class IvrAppParams(BaseModel):
    """`app_params` of an `app = "ivr"` route (spec §9)."""

    model_config = ConfigDict(extra="ignore")
    mode: Literal["step"] = "step"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    name: str = "step_ivr"
    ivr_id: str | None = None
    tenant_id: str | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v.rstrip("/")


MATCH_FIELDS = ("to.user", "to.host", "from.user", "from.host", "request_uri.user")


class RouteSettings(_Section):
    """A rustpbx-style `[[routes]]` entry."""

    name: str
    priority: int = 100
    match: dict[str, str] = Field(default_factory=dict)
    # The upstream document's short form: exact match on the To user.
    to_user: str | None = None
    app: Literal["ivr"] = "ivr"
    app_params: IvrAppParams
    # "early_media" answers with 183 and plays before the final response.
    answer: Literal["answer", "early_media"] = "answer"
    # Reachable from unknown sources (trunks, the public IVR). A route with
    # public = false takes only calls from authenticated extensions.
    public: bool = True
    inband_dtmf: bool = True

    @field_validator("match")
    @classmethod
    def _check_match(cls, v: dict[str, str]) -> dict[str, str]:
        for key, pattern in v.items():
            if key not in MATCH_FIELDS:
                raise ValueError(f"unknown match field {key!r}; known: {', '.join(MATCH_FIELDS)}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"match.{key}: bad regex {pattern!r}: {exc}") from exc
        return v

    @model_validator(mode="after")
    def _needs_condition(self) -> RouteSettings:
        if not self.match and self.to_user is None:
            raise ValueError(f"route {self.name!r} needs 'match' or 'to_user'")
        return self


class UserSettings(_Section):
    password: str | None = None
    contact: str | None = None

    @field_validator("contact")
    @classmethod
    def _check_contact(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^sips?:", v):
            raise ValueError(f"contact must be a sip: URI, got {v!r}")
        return v


class QueueSettings(_Section):
    """`[queues.<name>]` (and `[skill_groups.<name>]`): who is rung, in which order."""

    members: list[str] = Field(min_length=1)  # extensions or SIP URIs
    # ring_all: every member at once; round_robin: one at a time, starting after the
    # last one tried; longest_idle: one at a time, the member idle longest first.
    strategy: Literal["ring_all", "round_robin", "longest_idle"] = "ring_all"
    hold_music: str = "sounds/hold.wav"
    timeout_ms: int = Field(default=30_000, gt=0)  # the whole queue wait
    member_ring_ms: int = Field(default=15_000, gt=0)  # one member's turn (one at a time)


class TtsSettings(_Section):
    """Text to speech for `tts_text`: an HTTP service if `url` is set, else local
    espeak-ng when installed, else the provider gets an `error` event."""

    url: str | None = None
    voice: str = "en-us"
    timeout_ms: int = Field(default=5_000, gt=0)
    cache_dir: str = "sounds/.tts"


class AsrSettings(_Section):
    """Speech recognition for `input_voice`: none configured → `error` event."""

    url: str | None = None
    timeout_ms: int = Field(default=8_000, gt=0)


class RtpSettings(_Section):
    """`[rtp]`: where a call leg takes RTP and RTCP from (media.engine, strict latching).

    A leg answers where its caller's packets come from (symmetric RTP) and, once latched
    onto that source, drops every other source's packets unseen (counted in /metrics and
    the call record), so nobody spraying the port range can inject audio or digits."""

    # "strict": the latch moves (without signalling) only to a packet from the SDP
    # address, or to a new source with another SSRC once the latched one has been silent
    # for relatch_silence_ms. "loose": the same, but after the silence any SSRC will do,
    # for endpoints behind NATs that rebind a running stream to a new port mid-call.
    latching: Literal["strict", "loose"] = "strict"
    # Silence of the latched source after which the latch may move (milliseconds). Longer
    # is safer (a caller who falls silent cannot be taken over sooner); a very large value
    # never moves it without signalling (rtpengine's strict-source).
    relatch_silence_ms: int = Field(default=5000, ge=100)


class Settings(_Section):
    sip: SipSettings = Field(default_factory=SipSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    ivr: IvrSettings = Field(default_factory=IvrSettings)
    zmq: ZmqSettings = Field(default_factory=ZmqSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    users: dict[str, UserSettings] = Field(default_factory=dict)
    routes: list[RouteSettings] = Field(default_factory=list)
    # Named step-mode IVRs a `jump_ivr` action can go to (`[ivrs.<route_point>]`, same
    # keys as a route's `app_params`). Optional: no section, no jump targets.
    ivrs: dict[str, IvrAppParams] = Field(default_factory=dict)
    queues: dict[str, QueueSettings] = Field(default_factory=dict)
    skill_groups: dict[str, QueueSettings] = Field(default_factory=dict)
    tts: TtsSettings = Field(default_factory=TtsSettings)
    asr: AsrSettings = Field(default_factory=AsrSettings)
    rtp: RtpSettings = Field(default_factory=RtpSettings)
    source_path: str = Field(default="", exclude=True)

    def sorted_routes(self) -> list[RouteSettings]:
        """Routes in the order they are tried: lower priority value first, then file order."""
        return sorted(self.routes, key=lambda r: r.priority)


def _location(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    """Turn a pydantic error location into a TOML-ish key, e.g. routes[0].app_params.url."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse_config(text: str, source: str = "<string>") -> Settings:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"key {_location(err['loc'], data)}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
    settings.source_path = source
    return settings


def config_path() -> str:
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str | None = None) -> Settings:
    path = path or config_path()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(text, path)
