"""SIP transports of the front: UDP and TCP on the `[sip] listen` address (RFC 3261 §18).

A thin asyncio shell. Bytes that arrive go, one message at a time, to the
handler's `message_received(data, addr, reliable=...)` (the front); what the
front sends comes back through `send(data, addr, reliable)`:

* UDP: one datagram is one message. Datagrams larger than the size limit are
  dropped and counted.
* TCP: each connection frames its stream with `pbx.sip.framing.StreamFramer`.
  A CRLFCRLF ping is answered with a CRLF pong (RFC 5626 §3.5.1). A stream
  that cannot be framed (no or bad Content-Length, too large) gets the error
  response the framer suggests, if the head is readable, and is closed.
  Connections are kept in one table keyed by the peer's address, so responses
  go back on the connection the request came on and in-dialog requests to a
  TCP peer reuse its connection (RFC 3261 §18.2.2, §18.1.1); with no
  connection to that address one is opened and the bytes wait for it.
  Connections idle for `[sip] tcp_idle_s` are closed; one source IP may hold at
  most `[limits] tcp_connections_per_source` of them (the rate limit's exempt
  networks aside).
* Every incoming message (keep-alives aside) takes a token from its source
  IP's bucket (`pbx.ratelimit`); beyond the limit it is dropped unseen and
  counted in `stats` (exported on /metrics).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any, Protocol, cast

from pbx.config import SipSettings
from pbx.ratelimit import RateLimiter
from pbx.sip.authguard import source_key
from pbx.sip.framing import FramingError, Message, Ping, StreamFramer

log = logging.getLogger("pbx.transport")

Addr = tuple[str, int]
# Beyond this many open connections new ones are refused (closed at once).
MAX_TCP_CONNECTIONS = 8192
# Bytes queued for one connection that the peer does not read before we give up on it.
MAX_TCP_WRITE_BUFFER = 1 << 20
TCP_CONNECT_TIMEOUT_S = 5.0


def unmapped(host: str) -> str:
    """An IPv4 peer of a dual-stack listener (`listen = "[::]:5060"`) as the IPv4 address
    it is: the kernel gives it as ::ffff:a.b.c.d, and as that every IPv4 peer would share
    one IPv6 /64 in the budgets and lockouts and match no IPv4 `trusted_networks`."""
    if host.startswith("::ffff:"):
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
        if mapped is not None:
            return str(mapped)
    return host


class SipHandler(Protocol):
    def message_received(self, data: bytes, addr: Addr, *, reliable: bool = False) -> None: ...

    def stream_unframed(self, head: bytes, addr: Addr, error: FramingError) -> None: ...


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.owner._datagram_received(data, (unmapped(addr[0]), addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


class _TcpConnection(asyncio.Protocol):
    def __init__(self, owner: SipTransport, outbound_to: Addr | None = None) -> None:
        self.owner = owner
        self.framer = StreamFramer(owner.settings.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer: Addr = outbound_to or ("", 0)
        self.last_activity = 0.0
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer is not None:
            self.peer = (unmapped(str(peer[0])), int(peer[1]))
        self.last_activity = self.owner.now()
        self.owner._connection_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._connection_lost(self)

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closing:
            return
        if self.transport.get_write_buffer_size() > MAX_TCP_WRITE_BUFFER:
            log.info("TCP peer %s:%d does not read; closing", *self.peer)
            self.close()
            return
        self.last_activity = self.owner.now()
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()  # flushes what is queued first

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_activity = self.owner.now()
        try:
            self.framer.receive_data(data)
            while (event := self.framer.next_event()) is not None:
                if isinstance(event, Ping):
                    self.write(b"\r\n")  # pong
                elif isinstance(event, Message):
                    self.owner._message_received(event.data, self.peer, reliable=True)
                if self.closing:
                    return
        except FramingError as exc:
            self.owner.stats["sip_unframed"] += 1
            log.info("TCP stream from %s:%d cannot be framed: %s; closing", *self.peer, exc)
            self.owner._stream_unframed(exc, self.peer)
            self.close()


class SipTransport:
    """UDP socket, TCP listener and the table of TCP connections."""

    def __init__(self, settings: SipSettings, tcp_per_source: int = 32) -> None:
        self.settings = settings
        self.handler: SipHandler | None = None
        self.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst,
                                   exempt=tuple(settings.rate_limit_exempt))
        self.tcp_per_source = tcp_per_source
        self.connections: dict[Addr, _TcpConnection] = {}
        self._per_source: dict[str, int] = {}
        self._connecting: dict[Addr, list[bytes]] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_v6 = False  # an IPv6 (dual-stack) socket: IPv4 peers are sent to mapped
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats = {"sip_rate_limited": 0, "sip_oversize": 0, "sip_unframed": 0,
                      "tcp_connections": 0, "tcp_connections_total": 0,
                      "tcp_refused_per_source": 0}

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(host, port))
        sock = self._udp.get_extra_info("socket")
        self._udp_v6 = sock is not None and sock.family == socket.AF_INET6
        # asyncio makes an IPv6 listener IPv6-only; "::" (all addresses, as for UDP) is
        # then every address of both families: a listener each.
        self._server = await loop.create_server(
            lambda: _TcpConnection(self), None if host == "::" else host, port,
            reuse_address=True)

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            conn.close()
        for task in self._tasks:
            task.cancel()

    # ------------------------------------------------------------ in

    def _admit(self, data: bytes, addr: Addr) -> bool:
        if len(data) > self.settings.max_message_bytes:
            self.stats["sip_oversize"] += 1
            return False
        if not self.limiter.allow(addr[0], self.now()):
            self.stats["sip_rate_limited"] += 1
            return False
        return True

    def _datagram_received(self, data: bytes, addr: Addr) -> None:
        if not data.strip(b"\r\n \t"):
            return  # keep-alive (RFC 5626 §3.5.1): never rate-limited, never answered
        if self._admit(data, addr):
            self._message_received(data, addr, reliable=False)

    def _message_received(self, data: bytes, addr: Addr, *, reliable: bool) -> None:
        if reliable and not self._admit(data, addr):
            return
        if self.handler is None:
            return  # still starting: UDP senders retransmit, TCP ones time out
        try:
            self.handler.message_received(data, addr, reliable=reliable)
        except Exception:
            # A bug must cost one message, not the process (and never reach the caller).
            log.exception("unhandled error on a message from %s:%d", addr[0], addr[1])

    def _stream_unframed(self, exc: FramingError, addr: Addr) -> None:
        if self.handler is None or not exc.head:
            return
        try:
            self.handler.stream_unframed(exc.head, addr, exc)
        except Exception:
            log.exception("unhandled error answering an unframed stream from %s:%d", *addr)

    # ------------------------------------------------------------ connections

    def _connection_made(self, conn: _TcpConnection) -> None:
        if len(self.connections) >= MAX_TCP_CONNECTIONS:
            log.warning("too many TCP connections; refusing %s:%d", *conn.peer)
            conn.close()
            return
        ip = conn.peer[0]
        source = source_key(ip)
        held = self._per_source.get(source, 0)
        if held >= self.tcp_per_source and ip not in self.limiter.exempt:
            self.stats["tcp_refused_per_source"] += 1
            log.info("%s holds %d TCP connections already; refusing another", ip, held)
            conn.close()
            return
        old = self.connections.get(conn.peer)
        if old is not None and old is not conn:
            old.close()
            self._forget(old)
        self.connections[conn.peer] = conn
        self._per_source[source] = held + 1
        self.stats["tcp_connections_total"] += 1
        self.stats["tcp_connections"] = len(self.connections)

    def _connection_lost(self, conn: _TcpConnection) -> None:
        if self.connections.get(conn.peer) is conn:
            del self.connections[conn.peer]
            self._forget(conn)
        self.stats["tcp_connections"] = len(self.connections)

    def _forget(self, conn: _TcpConnection) -> None:
        """`conn` no longer counts against its source's connections."""
        source = source_key(conn.peer[0])
        held = self._per_source.get(source, 0) - 1
        if held > 0:
            self._per_source[source] = held
        else:
            self._per_source.pop(source, None)

    def sweep_idle(self) -> None:
        """Close connections that carried nothing for `tcp_idle_s`."""
        cutoff = self.now() - self.settings.tcp_idle_s
        for conn in list(self.connections.values()):
            if conn.last_activity < cutoff:
                log.debug("closing idle TCP connection to %s:%d", *conn.peer)
                conn.close()

    # ------------------------------------------------------------ out

    def is_connected(self, addr: Addr) -> bool:
        conn = self.connections.get(addr)
        return conn is not None and not conn.closing

    def send(self, data: bytes, addr: Addr, reliable: bool = False) -> None:
        if not reliable:
            if self._udp is None:
                return
            if self._udp_v6 and ":" not in addr[0]:
                addr = (f"::ffff:{addr[0]}", addr[1])  # the peer as the socket knows it
            try:
                self._udp.sendto(data, addr)
            except (OSError, ValueError) as exc:
                # An unusable destination (a host name, a closed port) costs that message only.
                log.warning("cannot send SIP to %s: %s", addr, exc)
            return
        conn = self.connections.get(addr)
        if conn is not None and not conn.closing:
            conn.write(data)
            return
        queued = self._connecting.get(addr)
        if queued is not None:
            queued.append(data)
            return
        self._connecting[addr] = [data]
        task = asyncio.get_running_loop().create_task(self._connect(addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, addr: Addr) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _TcpConnection(self, addr), addr[0], addr[1]),
                TCP_CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            dropped = self._connecting.pop(addr, [])
            log.info("cannot open TCP to %s:%d (%s); %d message(s) dropped",
                     addr[0], addr[1], exc, len(dropped))
            return
        for data in self._connecting.pop(addr, []):
            conn.write(data)
