"""Configuration: `config/pbx.toml` (or `$PBX_CONFIG`), validated with pydantic.

Every program loads the same file through `load_config()`. A bad file stops
start-up with `ConfigError`, whose text names the file, the key and the reason.
Relative paths are relative to the current directory, which is the project root
under supervisord (DESIGN §2 "paths").

`Settings` is the whole file, one field per TOML table. The sections that wire the
processes together (`[sip]`, `[media]`, `[ivr]`, `[zmq]`, `[admin]`, `[rtp]`,
`[sessions]`) and the dial plan (users, routes, IVRs, queues, `[tts]`, `[asr]`) are
defined here; the security sections (`[auth]`, `[policy]`, `[limits]`, `[privacy]`) in
`pbx.settings.security`, the storage ones (`[logging]`, `[traces]`, `[retention]`) in
`pbx.settings.storage`. Each key is documented by a short comment where it is defined.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pbx.settings.base import NetworkList
from pbx.settings.base import Section as _Section  # the base of every section class here
from pbx.settings.security import (
    AuthSettings,
    LimitSettings,
    PolicySettings,
    PrivacySettings,
)
from pbx.settings.speech import AsrSettings, TtsSettings
from pbx.settings.storage import LoggingSettings, RetentionSettings, TracesSettings
from pbx.settings.workers import IvrSettings, MediaSettings

DEFAULT_CONFIG_PATH = "config/pbx.toml"
CONFIG_ENV = "PBX_CONFIG"


class ConfigError(Exception):
    """A configuration file that cannot be used; the text says file, key and reason."""


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
    # Digest authentication (REGISTER, and INVITEs from extensions). Nonces are HMACs
    # under `auth_secret`: fronts sharing it recognise each other's nonces and answer
    # them with stale=true (one extra round trip on fail-over); unset, a random secret
    # per start is used. More in `[auth]`.
    realm: str = "pbx"
    auth_secret: str | None = None
    # The digest algorithms a 401/407 offers, one challenge each in this order (RFC 8760
    # §2.4: SHA-256 first), and the only ones accepted in credentials; a user's own
    # `digest_algorithms` overrides it, and a client named in `[auth] md5_user_agents`
    # is offered MD5 alone. ["SHA-256"] refuses MD5 altogether. sipp 3.6 answers only
    # the first challenge: ["MD5", "SHA-256"] for it.
    digest_algorithms: list[Literal["MD5", "SHA-256"]] = Field(
        default=["SHA-256", "MD5"], min_length=1
    )
    # TCP (RFC 3261 §18): connections with no traffic for this long are closed.
    tcp_idle_s: float = Field(default=120.0, gt=0)
    # Largest message accepted on TCP (UDP datagrams cannot exceed 64 KB anyway).
    max_message_bytes: int = Field(default=65536, ge=1024, le=1048576)
    # Per-source-IP token bucket on incoming messages; excess is dropped (0 disables).
    rate_limit_per_s: float = Field(default=200.0, ge=0)
    rate_limit_burst: float = Field(default=400.0, ge=1)
    # Sources (IP networks) the limit does not apply to: trunks, load generators.
    rate_limit_exempt: NetworkList = Field(default_factory=list)

    @field_validator("listen", "advertised")
    @classmethod
    def _check_addr(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        host, _ = parse_host_port(v, "address")
        if info.field_name == "listen":  # bound: an IP (a name failed at start-up)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"the host must be an IP address, got {host!r}") from None
        elif not re.fullmatch(r"[A-Za-z0-9.-]+|[0-9a-fA-F:.]+", host):  # in Via, Contact
            raise ValueError(f"the host must be an IP address or a host name, got {host!r}")
        return v

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen, "listen")

    @property
    def advertised_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.advertised or self.listen, "advertised")


# A CURVE key in Z85 (ZeroMQ RFC 32): 40 characters for 32 bytes.
Z85_KEY_RE = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
# sun_path of a Unix socket holds 108 bytes with the terminating NUL (unix(7)).
IPC_PATH_MAX_BYTES = 107
KEY_COMMAND = "python -m pbx.keys"


def endpoint_scope(endpoint: str) -> Literal["ipc", "loopback", "network"]:
    """Where a plane endpoint can be reached from: `ipc` (a Unix socket, guarded by its
    directory's permissions), `loopback` (tcp on a loopback IP: any local user) or
    `network` (tcp on any other address, interface name or `*`: needs CURVE).
    ValueError for endpoints the planes do not support."""
    transport, sep, address = endpoint.partition("://")
    if not sep or not address:
        raise ValueError(f"{endpoint!r} is not 'ipc://path' or 'tcp://host:port'")
    if transport == "ipc":
        if address.startswith("@"):
            # Linux abstract sockets have no file, hence no permissions: anyone can connect.
            raise ValueError(f"{endpoint!r}: abstract IPC sockets cannot be protected; "
                             "use a path in a private directory")
        if address == "*" or "/" not in address or address.endswith("/"):
            raise ValueError(f"{endpoint!r}: an IPC socket needs a path in its own "
                             "directory, e.g. 'ipc://run/zmq/media'")
        if len(address.encode()) > IPC_PATH_MAX_BYTES:
            raise ValueError(f"{endpoint!r}: the path is longer than a Unix socket allows "
                             f"({IPC_PATH_MAX_BYTES} bytes)")
        return "ipc"
    if transport != "tcp":
        raise ValueError(f"{endpoint!r}: the planes run over ipc:// or tcp:// only")
    if ";" in address:
        raise ValueError(f"{endpoint!r}: source-address endpoints are not supported")
    host, port = parse_host_port(address, "endpoint")  # refuses a wildcard port too
    try:
        return "loopback" if ipaddress.ip_address(host).is_loopback else "network"
    except ValueError:
        return "network"  # `*`, an interface name or a host name: beyond loopback


class ZmqSettings(_Section):
    """The media and IVR planes (ROUTER) and the events socket (PUB), bound by the front.

    Default: IPC sockets in `run/zmq`, which the front creates mode 0700 and refuses to
    use when group or other can open it (or another user owns it): only the PBX's user
    can connect. tcp:// on a loopback address is accepted without keys (any local user
    can connect: tests, trusted single-user hosts); tcp:// on any other address needs
    CURVE (ZeroMQ RFC 26), configured by the keys below (`python -m pbx.keys` prints
    them). With `server_public_key` set, every plane uses CURVE, on any transport.
    """

    media_endpoint: str = "ipc://run/zmq/media"
    ivr_endpoint: str = "ipc://run/zmq/ivr"
    events_endpoint: str = "ipc://run/zmq/events"
    # Each process's ZeroMQ I/O thread under SCHED_BATCH (Linux): waking for a message, it
    # never preempts its process's own thread (pbx.planes.plane_context, perf/README.md).
    io_thread_batch: bool = True
    # The front's CURVE key pair. Every program needs the public key (it turns CURVE
    # on); only the front's config holds the secret one.
    server_public_key: str | None = Field(default=None, validate_default=True)
    server_secret_key: str | None = None
    # This host's client key pair: media workers, IVR executors (and event subscribers).
    client_public_key: str | None = None
    client_secret_key: str | None = None
    # The front accepts only these client public keys, per plane (the ZAP handler).
    media_client_keys: list[str] = Field(default_factory=list)
    ivr_client_keys: list[str] = Field(default_factory=list)
    events_client_keys: list[str] = Field(default_factory=list)

    @field_validator("media_endpoint", "ivr_endpoint", "events_endpoint")
    @classmethod
    def _check_endpoint(cls, v: str) -> str:
        endpoint_scope(v)
        return v

    @field_validator("server_secret_key", "client_public_key", "client_secret_key")
    @classmethod
    def _check_key(cls, v: str | None) -> str | None:
        if v is not None and not Z85_KEY_RE.fullmatch(v):
            raise ValueError(f"not a CURVE key (40 Z85 characters, from `{KEY_COMMAND}`)")
        return v

    @field_validator("media_client_keys", "ivr_client_keys", "events_client_keys")
    @classmethod
    def _check_keys(cls, v: list[str]) -> list[str]:
        for i, key in enumerate(v):
            if not Z85_KEY_RE.fullmatch(key):
                raise ValueError(f"entry {i} is not a CURVE public key (40 Z85 characters, "
                                 f"from `{KEY_COMMAND}`)")
        return v

    @field_validator("server_public_key")
    @classmethod
    def _curve_where_needed(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            if not Z85_KEY_RE.fullmatch(v):
                raise ValueError(f"not a CURVE key (40 Z85 characters, from `{KEY_COMMAND}`)")
            return v
        for name in ("media_endpoint", "ivr_endpoint", "events_endpoint"):
            endpoint = info.data.get(name)
            if endpoint is not None and endpoint_scope(endpoint) == "network":
                raise ValueError(
                    f"{name} {endpoint!r} is reachable beyond loopback, so the planes need "
                    f"CURVE: set server_public_key and the other keys printed by "
                    f"`{KEY_COMMAND}` (or bind to ipc:// or a loopback address)")
        return v

    @model_validator(mode="after")
    def _pairs_complete(self) -> ZmqSettings:
        if self.server_public_key is None:
            for name in ("server_secret_key", "client_public_key", "client_secret_key"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is set but server_public_key is not "
                                     "(it is what turns CURVE on)")
        if (self.client_public_key is None) != (self.client_secret_key is None):
            raise ValueError("client_public_key and client_secret_key go together")
        return self

    @property
    def curve(self) -> bool:
        return self.server_public_key is not None

    def endpoints(self) -> dict[str, str]:
        """Plane name (also its ZAP domain) -> endpoint."""
        return {"media": self.media_endpoint, "ivr": self.ivr_endpoint,
                "events": self.events_endpoint}


def is_loopback_host(host: str) -> bool:
    """A literal loopback address (127.0.0.0/8, ::1) or `localhost`."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AdminSettings(_Section):
    listen: str = "127.0.0.1:8088"
    # Bearer token every request must carry (`Authorization: Bearer ...`, or `?token=`);
    # the /debug page asks for it and sends it as a header (a subprotocol for its
    # WebSocket), never in a URL. Required when `listen` is not loopback.
    token: str | None = Field(default=None, min_length=16)
    # Host names the listener answers to besides its listen address, localhost and the
    # loopback addresses (a DNS-rebinding page names its own host and is refused).
    allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("listen")
    @classmethod
    def _check_addr(cls, v: str) -> str:
        parse_host_port(v, "listen")
        return v

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> AdminSettings:
        host, _ = parse_host_port(self.listen, "listen")
        if self.token is None and not is_loopback_host(host):
            raise ValueError(f"token is required when listen ({self.listen}) is not a "
                             "loopback address")
        return self


_DEFAULT_FALLBACK: dict[str, Any] = {"type": "hangup", "prompt": "sounds/error.wav"}


class RetrySettings(BaseModel):
    """`app_params.retry` of a step-mode IVR route (spec §9)."""

    model_config = ConfigDict(extra="ignore")
    max_retries: int = Field(default=3, ge=0)
    timeout_ms: int = Field(default=1000, gt=0)
    fallback: dict[str, Any] = Field(default_factory=lambda: dict(_DEFAULT_FALLBACK))

    @field_validator("fallback")
    @classmethod
    def _check_fallback(cls, v: dict[str, Any]) -> dict[str, Any]:
        """The fallback runs when the provider is down: a typo must stop start-up, not
        surface in the first outage. Checked as the provider's answers are."""
        from pbx.ivr.models import ActionError, parse_action  # models import this module

        # A route's params travel in each IVR session's state and are validated with
        # every event (issue 9): the default (most routes') is known good.
        if v == _DEFAULT_FALLBACK:
            return v
        try:
            parse_action(v)
        except ActionError as exc:
            raise ValueError(f"not an action this PBX can execute: {exc.reason}") from None
        return v


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
    # Which behaviour the provider gets where rustpbx's code and the upstream document
    # differ: "spec" (the document as written) or "rustpbx" (menu misses and timeouts
    # as plain `dtmf` / `dtmf_timeout`, and the rest listed in docs/compat-rustpbx.md),
    # so that providers written against rustpbx run unchanged.
    compat: Literal["spec", "rustpbx"] = "spec"

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
    # RFC 3515 REFER from an unknown (unauthenticated) caller on this route; its target
    # still passes the same checks as an INVITE from that caller (DESIGN §6).
    allow_refer: bool = False

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
    # A static contact: one more binding of the user, rung with its registrations.
    contact: str | None = None
    # The digest algorithms this user is challenged with and may answer with (default:
    # `[sip] digest_algorithms`); the user is the To of a REGISTER, the From of an
    # INVITE. ["SHA-256"]: MD5 is refused for this user, whatever the client says;
    # ["MD5"]: one challenge, for a client libre-like but with its own User-Agent.
    digest_algorithms: list[Literal["MD5", "SHA-256"]] | None = Field(default=None,
                                                                      min_length=1)

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


class SessionWatchSettings(_Section):
    """`[sessions]`: how the front keeps IVR sessions from waiting in silence (issue 8)."""

    # How long past a session's own wait bound (the timer or recording it armed,
    # `IvrReply.wait_ms`) the front waits before it gives the session a `wait_expired`
    # input, which its provider hears as an `error` event. Covers a late timer on a
    # loaded media worker and the event's way back.
    wait_grace_ms: int = Field(default=5_000, gt=0)
    # The bound of a wait the executor gives none for (a prompt playing, whose length
    # it does not know): a prompt longer than this is taken for a lost one.
    max_wait_ms: int = Field(default=600_000, gt=0)
    # The longest one event may stay with the executors, however long their heartbeats
    # say they are working on it (a provider's retries and `api` calls take far less);
    # past it the call ends with a traced error.
    max_event_ms: int = Field(default=600_000, gt=0)
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
    auth: AuthSettings = Field(default_factory=AuthSettings)
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
    policy: PolicySettings = Field(default_factory=PolicySettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    traces: TracesSettings = Field(default_factory=TracesSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    sessions: SessionWatchSettings = Field(default_factory=SessionWatchSettings)
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
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte {exc.start}): save it as UTF-8") from None
    return parse_config(text, path)
