"""pbx.broker: a send to a worker that is not (or no longer) connected reports failure
(ROUTER_MANDATORY), so the front can try another worker at once; with CURVE, only the
listed client keys get in (on each plane and the events socket); IPC planes work."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import uvloop
import zmq
import zmq.asyncio

from pbx import broker as broker_module
from pbx.broker import DRAIN_BATCH, Broker
from pbx.config import ZmqSettings, parse_config
from pbx.messages import IvrReady, MediaEvent, MediaTimer, TimerFired, decode, encode
from pbx.planes import configure_client, prepare
from tests.e2e.harness import free_port
from tests.zmq_peer import DEADLINE_S, Peer


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
        heard: list[bytes] = []
        broker.start(lambda i, m: None, lambda i, m: heard.append(i))
        msg = IvrReady(executor_id="x", capacity=1)
        unknown = broker.send_ivr(b"nobody", msg)
        # A connected worker gets it; once it has gone, sending fails again.
        dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"w1")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(settings.ivr_endpoint)
        await dealer.send(encode(msg))
        for _ in range(250):  # the ROUTER knows w1 once its message is in
            if heard:
                break
            await asyncio.sleep(0.02)
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



# ---------------------------------------------------------------- the edge-triggered FD
#
# The broker reads plain sockets from the loop's reader on zmq.FD, which signals once
# when the socket's commands go from none to some; any send (or EVENTS, or recv) may
# consume that signal. These run real peers (DEALERs in processes of their own) against
# the front's broker, on asyncio's loop and on uvloop (the front's), and check that
# nothing waits for a wake-up that never comes. The bounds are generous (a loaded
# 2-core machine): a broker that loses the edge does not finish at all.

T = TypeVar("T")
LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


def run_on(loop_kind: str, main: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(main) if loop_kind == "uvloop" else asyncio.run(main)


def timer_event(n: int) -> bytes:
    """What a media worker sends: a timer event, numbered by its call id."""
    return encode(MediaEvent(call_id=str(n), event=TimerFired(timer_id=n)))


def timer_command(n: int) -> MediaTimer:
    """What the front sends a media worker."""
    return MediaTimer(call_id=str(n), timer_id=n, delay_ms=20)


async def until(condition: Callable[[], bool], deadline_s: float = DEADLINE_S) -> bool:
    """Wait in the loop (the broker runs meanwhile) until `condition`, or the deadline."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True


@LOOPS
@pytest.mark.parametrize("gap_s", [0.0, 0.0001], ids=["burst", "stream"])
def test_events_answered_one_by_one_are_all_read_and_answered(loop_kind: str, gap_s: float
                                                              ) -> None:
    """5,000 events from a worker, at once or streamed, each answered by the front: the
    odd ones from inside the handler (a send within the drain), the even ones on the
    next loop iteration (as a timer or SIP would). Every event is handled, in order, and
    every answer is sent and arrives."""
    count = 5_000

    async def main() -> tuple[list[str], list[bool], list[bytes]]:
        settings = endpoints()
        broker = Broker(settings)
        handled: list[str] = []
        sent: list[bool] = []
        loop = asyncio.get_running_loop()

        def answer(identity: bytes, n: int) -> None:
            sent.append(broker.send_media(identity, timer_command(n)))

        def on_media(identity: bytes, msg: MediaEvent) -> None:
            handled.append(msg.call_id)
            n = int(msg.call_id)
            if n % 2:
                answer(identity, n)
            else:
                loop.call_soon(answer, identity, n)

        broker.start(on_media, lambda i, m: None)
        try:
            with Peer(settings.media_endpoint, b"w1", [timer_event(n) for n in range(count)],
                      expect=count, gap_s=gap_s) as peer:
                await until(lambda: len(handled) == count and peer.heard_count == count)
        finally:
            broker.close()
        return handled, sent, peer.heard

    handled, sent, answers = run_on(loop_kind, main())
    assert handled == [str(n) for n in range(count)]
    assert sent == [True] * count
    assert sorted(decode(a).timer_id for a in answers) == list(range(count))


@LOOPS
def test_events_arriving_while_the_front_only_sends_are_read(loop_kind: str) -> None:
    """The front sends a worker commands all the time, from its own callbacks (no message
    handler runs), while the worker's events trickle in: those sends take the FD's
    signals, and every event must still be read, without a new message to wake it."""
    count = 2_000
    # Bounded under the pipe's low-water mark (98,976 for an HWM of 100,000): no other
    # signal comes from the worker reading them.
    chunk, sends_max = 100, 90_000

    async def main() -> tuple[list[str], int, int]:
        settings = endpoints()
        broker = Broker(settings)
        handled: list[str] = []
        broker.start(lambda i, msg: handled.append(msg.call_id), lambda i, m: None)
        sent = refused = 0
        try:
            with Peer(settings.media_endpoint, b"w1", [timer_event(n) for n in range(count)],
                      expect=sends_max, gap_s=0.0005):
                await until(lambda: bool(handled))  # the ROUTER knows w1
                while len(handled) < count and sent < sends_max:
                    for _ in range(chunk):
                        refused += not broker.send_media(b"w1", timer_command(sent))
                        sent += 1
                    await asyncio.sleep(0.001)
                # Sending stopped (all read, or the cap): the rest must come all the same.
                await until(lambda: len(handled) == count, 5.0)
        finally:
            broker.close()
        return handled, sent, refused

    handled, sent, refused = run_on(loop_kind, main())
    assert len(handled) == count, f"{len(handled)} of {count} read, the front sent {sent}"
    assert handled == [str(n) for n in range(count)]
    assert refused == 0


@LOOPS
def test_two_busy_planes_and_the_loop_are_served_in_turn(loop_kind: str) -> None:
    """A backlog on each plane: both are handled, interleaved in batches (one plane's
    backlog never runs whole before the other's turn), and the loop's other work (SIP,
    timers) runs after one batch of each, not after the backlogs."""
    count = 3_000

    async def main() -> list[tuple[str, str]]:
        settings = endpoints()
        broker = Broker(settings)
        handled: list[tuple[str, str]] = []
        frames = [timer_event(n) for n in range(count)]
        try:
            with Peer(settings.media_endpoint, b"w1", frames, expect=1) as media, \
                    Peer(settings.ivr_endpoint, b"e1", frames, expect=1) as ivr:
                # Both backlogs queued in the front's sockets before it reads.
                await until(lambda: media.sent == count and ivr.sent == count)
                await asyncio.sleep(0.5)
                broker.start(lambda i, msg: handled.append(("media", msg.call_id)),
                             lambda i, msg: handled.append(("ivr", msg.call_id)))
                asyncio.get_running_loop().call_soon(handled.append, ("loop", ""))
                await until(lambda: len(handled) == 2 * count + 1)
        finally:
            broker.close()
        return handled

    handled = run_on(loop_kind, main())
    for plane in ("media", "ivr"):
        assert [n for p, n in handled if p == plane] == [str(n) for n in range(count)]
    longest = max(len(list(run)) for _, run in itertools.groupby(p for p, _ in handled))
    # A batch per plane per loop iteration: two in a row at most (one iteration's end,
    # the next one's start).
    assert longest <= 2 * DRAIN_BATCH, longest
    assert handled.index(("loop", "")) <= 2 * DRAIN_BATCH


def test_malformed_messages_are_dropped_and_the_next_one_is_read(
        caplog: pytest.LogCaptureFixture) -> None:
    """A peer's message of several frames, or one that is not a message, is logged and
    dropped whole: the stream stays aligned (the next message's identity is not taken
    for a payload) and the next good message is handled."""
    async def main() -> list[tuple[bytes, str]]:
        settings = endpoints()
        broker = Broker(settings)
        handled: list[tuple[bytes, str]] = []
        broker.start(lambda i, msg: handled.append((i, msg.call_id)), lambda i, m: None)
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IDENTITY, b"w1")
        dealer.connect(settings.media_endpoint)
        try:
            dealer.send_multipart([timer_event(1), b"w1", timer_event(2)])
            dealer.send(b"not a message")
            dealer.send(timer_event(3))
            await until(lambda: bool(handled), 10.0)
            await asyncio.sleep(0.1)
        finally:
            dealer.close(0)
            ctx.term()
            broker.close()
        return handled

    assert asyncio.run(main()) == [(b"w1", "3")]
    assert "media plane: dropped a message of 4 frames" in caplog.text
    assert "media plane: bad frame from b'w1': not JSON" in caplog.text


@LOOPS
def test_send_to_a_gone_worker_fails_at_once(loop_kind: str, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Over IPC (the default planes): a worker that has disconnected gets False."""
    async def main() -> tuple[bool, list[bool]]:
        settings = ZmqSettings(media_endpoint=f"ipc://{tmp_path}/media",
                               ivr_endpoint=f"ipc://{tmp_path}/ivr",
                               events_endpoint=f"ipc://{tmp_path}/events")
        broker = Broker(settings)
        heard: list[bytes] = []
        broker.start(lambda i, msg: heard.append(i), lambda i, m: None)
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IDENTITY, b"w1")
        dealer.connect(settings.media_endpoint)
        dealer.send(timer_event(1))
        await until(lambda: bool(heard), 10.0)
        connected = broker.send_media(b"w1", timer_command(1))
        dealer.close(0)
        results: list[bool] = []

        def refused() -> bool:  # the disconnect reaches the ROUTER shortly
            results.append(broker.send_media(b"w1", timer_command(2)))
            return not results[-1]

        await until(refused, 10.0)
        broker.close()
        ctx.term()
        return connected, results

    connected, results = run_on(loop_kind, main())
    assert connected is True
    assert not results[-1], f"{len(results)} sends after the worker left, none refused"
    assert "cannot send media_timer to b'w1': Host unreachable" in caplog.text


@LOOPS
def test_send_to_a_worker_that_does_not_read_fails_when_its_queue_is_full(
        loop_kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """A worker that stopped reading: sends are queued up to the high-water mark, then
    fail at once (EAGAIN) instead of blocking the front or vanishing."""
    async def main() -> int | None:
        settings = endpoints()
        broker = Broker(settings)
        heard: list[bytes] = []
        broker.start(lambda i, msg: heard.append(i), lambda i, m: None)
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IDENTITY, b"w1")
        dealer.setsockopt(zmq.RCVHWM, 1)
        dealer.connect(settings.media_endpoint)
        dealer.send(timer_event(1))
        await until(lambda: bool(heard), 10.0)
        refused_at = None
        for n in range(400_000):  # the ROUTER's SNDHWM is 100,000, plus what is in transit
            if not broker.send_media(b"w1", timer_command(n)):
                refused_at = n
                break
            if n % 1000 == 0:
                await asyncio.sleep(0)
        dealer.close(0)
        broker.close()
        ctx.term()
        return refused_at

    refused_at = run_on(loop_kind, main())
    assert refused_at is not None and refused_at >= 100_000
    assert "cannot send media_timer to b'w1': Resource temporarily unavailable" in caplog.text


class _CountingEvents:
    """A reader's socket, counting the EVENTS checks made on it."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.events_checks = 0

    def getsockopt(self, option: int) -> Any:
        if option == zmq.EVENTS:
            self.events_checks += 1
        return self.sock.getsockopt(option)


@LOOPS
def test_sends_of_one_iteration_cost_one_events_check_per_plane(loop_kind: str) -> None:
    """Each EVENTS check makes libzmq process its commands (syscalls): 50 sends on each
    plane from one callback are followed by one check per plane on the next iteration,
    not one per send (the edge-triggered tests above check that nothing is missed)."""

    async def main() -> tuple[int, int, int, int]:
        broker = Broker(endpoints())
        broker.start(lambda i, m: None, lambda i, m: None)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0.05)  # the readers' first drains
            media = _CountingEvents(broker.media)
            ivr = _CountingEvents(broker.ivr)
            assert broker._media_reader is not None and broker._ivr_reader is not None
            broker._media_reader.sock = media  # type: ignore[assignment]
            broker._ivr_reader.sock = ivr  # type: ignore[assignment]

            def burst() -> None:
                for n in range(50):
                    broker.send_media(b"w1", timer_command(n))
                    broker.send_ivr(b"e1", timer_command(n))

            loop.call_soon(burst)
            await asyncio.sleep(0.05)
            first = media.events_checks, ivr.events_checks
            loop.call_soon(burst)
            await asyncio.sleep(0.05)
        finally:
            broker.close()
        return (*first, media.events_checks, ivr.events_checks)

    counts = run_on(loop_kind, main())
    assert counts == (1, 1, 2, 2)


def test_events_are_encoded_and_sent_only_while_someone_subscribes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The events socket counts its subscriptions: with none, `publish` neither encodes
    nor sends; two subscribers get events, and when the last one goes (its
    unsubscription sent by libzmq on the disconnect) publishing stops again."""
    encoded: list[object] = []
    real_dumps = broker_module.orjson.dumps

    class CountingOrjson:
        @staticmethod
        def dumps(obj: object) -> bytes:
            encoded.append(obj)
            return real_dumps(obj)

    monkeypatch.setattr(broker_module, "orjson", CountingOrjson)

    async def main() -> tuple[int, list[int], list[int], int]:
        settings = endpoints()
        broker = Broker(settings)
        broker.start(lambda i, m: None, lambda i, m: None)
        ctx = zmq.Context()
        subs: list[zmq.Socket[bytes]] = []
        try:
            await asyncio.sleep(0.05)
            broker.publish({"n": 0})  # nobody yet
            before = len(encoded)
            for _ in range(2):
                sub = ctx.socket(zmq.SUB)
                sub.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.connect(settings.events_endpoint)
                subs.append(sub)
            # Both subscriptions read (libzmq passes the first of the topic only).
            assert await until(lambda: broker.subscribed_topics == 1)
            await asyncio.sleep(0.2)  # the second subscriber's handshake too
            broker.publish({"n": 1})
            heard = []
            for sub in subs:
                heard.append(orjson.loads(sub.recv())["n"] if sub.poll(2000) else -1)
            subs[0].close(0)
            await asyncio.sleep(0.2)
            broker.publish({"n": 2})
            heard_after = [orjson.loads(subs[1].recv())["n"] if subs[1].poll(2000) else -1]
            subs[1].close(0)
            assert await until(lambda: broker.subscribed_topics == 0)
            broker.publish({"n": 3})
            return before, heard, heard_after, len(encoded)
        finally:
            for sub in subs:
                sub.close(0)
            broker.close()
            ctx.term()

    before, heard, heard_after, total = uvloop.run(main())
    assert before == 0
    assert heard == [1, 1] and heard_after == [2]
    assert total == 2  # n=1 and n=2 only
