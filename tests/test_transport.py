"""The transport shell on real loopback sockets with a recording handler: TCP framing,
keep-alive pong, the unframed-stream error path, connection reuse both ways, idle
close, the UDP size limit and the per-source rate limit."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from pbx.config import SipSettings
from pbx.sip.framing import FramingError
from pbx.transport import SipTransport

Addr = tuple[str, int]

MSG = (b"OPTIONS sip:pbx@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bK1\r\n"
       b"From: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n"
       b"Content-Length: 0\r\n\r\n")


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, Addr, bool]] = []
        self.unframed: list[tuple[bytes, Addr, int]] = []
        self.transport: SipTransport | None = None

    def message_received(self, data: bytes, addr: Addr, *, reliable: bool = False) -> None:
        self.messages.append((data, addr, reliable))

    def stream_unframed(self, head: bytes, addr: Addr, error: FramingError) -> None:
        self.unframed.append((head, addr, error.status))
        assert self.transport is not None
        self.transport.send(b"SIP/2.0 400 Bad Request\r\n\r\n", addr, True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(pred: Callable[[], Any], timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


def run(test: Callable[[SipTransport, Recorder, int], Awaitable[None]], host: str = "127.0.0.1",
        **settings: Any) -> None:
    """On uvloop, as in the front (its transports are not asyncio.Transport subclasses)."""
    async def main() -> None:
        port = free_port()
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        transport = SipTransport(SipSettings(listen=listen, **settings))
        rec = Recorder()
        rec.transport = transport
        transport.handler = rec
        await transport.start(host, port)
        try:
            await test(transport, rec, port)
        finally:
            transport.close()
            await asyncio.sleep(0)
    uvloop.run(main())


def test_tcp_messages_pong_and_reply_on_the_same_connection() -> None:
    async def body(transport: SipTransport, rec: Recorder, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\r\n\r\n" + MSG + MSG[:20])
        assert await asyncio.wait_for(reader.readexactly(2), 2) == b"\r\n"  # pong
        writer.write(MSG[20:])
        await until(lambda: len(rec.messages) == 2)
        (data, addr, reliable) = rec.messages[0]
        assert data == MSG and reliable and addr == writer.get_extra_info("sockname")
        transport.send(b"SIP/2.0 200 OK\r\n\r\n", addr, True)
        assert await asyncio.wait_for(reader.readexactly(18), 2) == b"SIP/2.0 200 OK\r\n\r\n"
        assert transport.stats["tcp_connections"] == 1
        writer.close()
        await until(lambda: transport.stats["tcp_connections"] == 0)
    run(body)


def test_unframed_stream_is_answered_and_closed() -> None:
    async def body(transport: SipTransport, rec: Recorder, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(MSG.replace(b"Content-Length: 0\r\n", b"") + MSG)
        data = await asyncio.wait_for(reader.read(), 2)  # read() to EOF: closed by us
        assert data == b"SIP/2.0 400 Bad Request\r\n\r\n"
        assert rec.messages == [] and rec.unframed[0][2] == 400
        assert transport.stats["sip_unframed"] == 1
        writer.close()
    run(body)


def test_outbound_connection_is_opened_then_reused() -> None:
    async def body(transport: SipTransport, rec: Recorder, port: int) -> None:
        accepted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.append((r, w))
        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        peer = server.sockets[0].getsockname()[:2]
        transport.send(b"one", peer, True)
        transport.send(b"two", peer, True)  # queued while connecting
        await until(lambda: accepted)
        r, w = accepted[0]
        assert await asyncio.wait_for(r.readexactly(6), 2) == b"onetwo"
        transport.send(b"three", peer, True)
        assert await asyncio.wait_for(r.readexactly(5), 2) == b"three"
        assert len(accepted) == 1
        # what the peer sends back on it reaches the handler as reliable
        w.write(MSG)
        await until(lambda: rec.messages)
        assert rec.messages[0][1] == peer and rec.messages[0][2]
        w.close()
        server.close()
    run(body)


def test_idle_connections_are_closed() -> None:
    async def body(transport: SipTransport, rec: Recorder, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: transport.stats["tcp_connections"] == 1)
        transport.sweep_idle()
        assert transport.stats["tcp_connections"] == 1  # not idle yet
        await asyncio.sleep(0.15)
        transport.sweep_idle()
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
    run(body, tcp_idle_s=0.1)


def test_udp_rate_limit_and_size_limit() -> None:
    async def body(transport: SipTransport, rec: Recorder, port: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(30):
                s.sendto(MSG, ("127.0.0.1", port))
            s.sendto(b"\r\n\r\n", ("127.0.0.1", port))  # keep-alives are not counted
            s.sendto(MSG + b"x" * 2000, ("127.0.0.1", port))
            await until(lambda: transport.stats["sip_rate_limited"]
                        + len(rec.messages) + transport.stats["sip_oversize"] == 31)
        assert len(rec.messages) == 10 and not rec.messages[0][2]
        assert transport.stats["sip_rate_limited"] == 20
        assert transport.stats["sip_oversize"] == 1
    run(body, rate_limit_per_s=1, rate_limit_burst=10, max_message_bytes=1024)


def test_ipv4_peers_of_a_dual_stack_listener_are_ipv4_addresses() -> None:
    """`listen = "[::]:5060"` takes IPv4 too, as IPv4-mapped IPv6 (::ffff:a.b.c.d). The
    core sees the IPv4 address (budgets, lockouts, trusted_networks key on it: as
    ::ffff:... every IPv4 peer fell into one IPv6 /64), and answers reach it."""
    async def body(transport: SipTransport, rec: Recorder, port: int) -> None:
        loop = asyncio.get_running_loop()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        try:
            peer.sendto(MSG, ("127.0.0.1", port))
            await until(lambda: len(rec.messages) == 1)
            assert rec.messages[0][1] == peer.getsockname()
            transport.send(b"SIP/2.0 200 OK\r\n\r\n", peer.getsockname())
            data = await asyncio.wait_for(loop.sock_recv(peer, 100), 2)
            assert data == b"SIP/2.0 200 OK\r\n\r\n"
        finally:
            peer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(MSG)
        await until(lambda: len(rec.messages) == 2)
        assert rec.messages[1][1] == writer.get_extra_info("sockname")
        writer.close()
    run(body, host="::")
