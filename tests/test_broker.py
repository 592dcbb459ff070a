"""pbx.broker: a send to a worker that is not (or no longer) connected reports failure
(ROUTER_MANDATORY), so the front can try another worker at once."""

from __future__ import annotations

import asyncio
import gc

import pytest
import zmq
import zmq.asyncio

from pbx.broker import Broker
from pbx.config import ZmqSettings
from pbx.messages import IvrReady
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
