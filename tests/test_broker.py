"""pbx.broker: a send to a worker that is not (or no longer) connected reports failure
(ROUTER_MANDATORY), so the front can try another worker at once; with CURVE, only the
listed client keys get in (on each plane and the events socket); IPC planes work."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from pbx.broker import Broker
from pbx.config import ZmqSettings, parse_config
from pbx.messages import IvrReady, encode
from pbx.planes import configure_client, prepare
from tests.e2e.harness import free_port


def endpoints() -> ZmqSettings:
    return ZmqSettings(
        media_endpoint=f"tcp://127.0.0.1:{free_port()}",
        ivr_endpoint=f"tcp://127.0.0.1:{free_port()}",
        events_endpoint=f"tcp://127.0.0.1:{free_port()}",
    )


def test_send_to_unknown_or_gone_worker_fails(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> tuple[bool, bool, bool]:
        settings = endpoints()
        broker = Broker(settings)
        msg = IvrReady(executor_id="x", capacity=1)
        unknown = broker.send_ivr(b"nobody", msg)
        # A connected worker gets it; once it has gone, sending fails again.
        dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"w1")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(settings.ivr_endpoint)
        await dealer.send(b"hello")
        await broker.ivr.recv_multipart()  # the ROUTER knows w1 now
        connected = broker.send_ivr(b"w1", msg)
        assert await asyncio.wait_for(dealer.recv(), 5)
        dealer.close(0)
        gone = True
        for _ in range(100):  # the disconnect reaches the ROUTER shortly
            await asyncio.sleep(0.02)
            gone = broker.send_ivr(b"w1", msg)
            if not gone:
                break
        broker.close()
        return unknown, connected, gone

    unknown, connected, gone = asyncio.run(run())
    gc.collect()
    assert unknown is False
    assert connected is True
    assert gone is False
    assert "never retrieved" not in caplog.text
    assert "cannot send ivr_ready to b'nobody'" in caplog.text


# ---------------------------------------------------------------- who may connect


def curve_settings(accepted: bytes) -> ZmqSettings:
    server_public, server_secret = zmq.curve_keypair()
    return ZmqSettings(
        media_endpoint=f"tcp://127.0.0.1:{free_port()}",
        ivr_endpoint=f"tcp://127.0.0.1:{free_port()}",
        events_endpoint=f"tcp://127.0.0.1:{free_port()}",
        server_public_key=server_public.decode(), server_secret_key=server_secret.decode(),
        media_client_keys=[accepted.decode()], ivr_client_keys=[accepted.decode()],
        events_client_keys=[accepted.decode()],
    )


def client(ctx: zmq.asyncio.Context, kind: int, settings: ZmqSettings, endpoint: str,
           pair: tuple[bytes, bytes] | None, identity: bytes = b"") -> zmq.asyncio.Socket:
    """A client socket: CURVE with `pair` (through pbx.planes), or plain without."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    if pair is not None:
        as_client = settings.model_copy(update={
            "client_public_key": pair[0].decode(), "client_secret_key": pair[1].decode()})
        configure_client(sock, as_client, endpoint)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def test_curve_planes_accept_listed_client_keys_only(caplog: pytest.LogCaptureFixture) -> None:
    good = zmq.curve_keypair()
    stranger = zmq.curve_keypair()

    async def run() -> tuple[list[tuple[bytes, object]], dict[str, int], list[bytes], int]:
        settings = curve_settings(accepted=good[0])
        broker = Broker(settings)
        heard: list[tuple[bytes, object]] = []
        stats: dict[str, int] = {}
        broker.start(lambda i, msg: heard.append((i, msg)),
                     lambda i, msg: heard.append((i, msg)), stats)
        ctx = zmq.asyncio.Context()
        sockets = []
        for name, pair in ((b"good", good), (b"stranger", stranger), (b"plain", None)):
            for endpoint in (settings.media_endpoint, settings.ivr_endpoint):
                dealer = client(ctx, zmq.DEALER, settings, endpoint, pair, name)
                sockets.append(dealer)
                await dealer.send(encode(IvrReady(executor_id=name.decode(), capacity=1)))
        subs = {name: client(ctx, zmq.SUB, settings, settings.events_endpoint, pair)
                for name, pair in ((b"good", good), (b"stranger", stranger), (b"plain", None))}
        received: list[bytes] = []
        for _ in range(100):  # PUB drops until the subscription arrives: publish until heard
            broker.publish({"type": "call", "n": 1})
            await asyncio.sleep(0.02)
            if await subs[b"good"].poll(0):
                received.append(b"good")
                break
        for _ in range(250):  # every handshake decided (a loaded machine is slow)
            if stats["zmq_auth_rejected"] >= 3 and len(heard) >= 2:
                break
            await asyncio.sleep(0.02)
        broker.publish({"type": "call", "n": 2})
        await asyncio.sleep(0.2)
        for name in (b"stranger", b"plain"):
            if await subs[name].poll(0):
                received.append(name)
        for sock in [*sockets, *subs.values()]:
            sock.close(0)
        ctx.term()
        broker.close()
        return heard, stats, received, len(heard)

    heard, stats, received, _ = asyncio.run(run())
    assert sorted(identity for identity, _ in heard) == [b"good", b"good"]  # both planes
    assert received == [b"good"]
    # The stranger's key was refused on each of the three sockets; the plain client
    # never got as far as ZAP (CURVE server, NULL client: the handshake fails).
    assert stats["zmq_auth_rejected"] == 3
    assert f"client key {stranger[0].decode()} is not accepted on the 'ivr' plane" in caplog.text


def test_default_planes_are_ipc_in_a_private_directory(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults, from the project root (here a scratch one): run/zmq/, mode 0700."""
    monkeypatch.chdir(tmp_path)
    defaults = parse_config("", "pbx.toml")
    prepare(defaults, "front")
    directory = tmp_path / "run" / "zmq"
    assert directory.stat().st_mode & 0o777 == 0o700
    settings = defaults.zmq

    async def run() -> list[bytes]:
        broker = Broker(settings)
        heard: list[bytes] = []
        broker.start(lambda i, msg: None, lambda i, msg: heard.append(i))
        ctx = zmq.asyncio.Context()
        dealer = client(ctx, zmq.DEALER, settings, settings.ivr_endpoint, None, b"w1")
        await dealer.send(encode(IvrReady(executor_id="w1", capacity=1)))
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        dealer.close(0)
        ctx.term()
        broker.close()
        return heard

    assert asyncio.run(run()) == [b"w1"]
    assert sorted(p.name for p in directory.iterdir()) == ["events", "ivr", "media"]
