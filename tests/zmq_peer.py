"""A worker's DEALER in a process of its own, for tests of the front's broker.

A process, not a thread: a thread shares the GIL with the front's loop, so its sends
fall mostly while the loop waits in the selector, and the races the broker must
survive (a message arriving while the front runs Python and sends) become rare.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.sharedctypes
import queue
import time
from typing import Any

import zmq

DEADLINE_S = 60.0
_SPAWN = multiprocessing.get_context("spawn")  # never fork a process holding a zmq context


class Peer:
    """Sends `frames` (`gap_s` apart) and reads whatever the front sends, until it has
    sent them all and heard `expect` messages, `stop()`, or the deadline. It stays
    connected until then (LINGER 0: closing drops what is unsent). `sent` and
    `heard_count` are live; `heard` (the frames) is there after `join()`. As a context
    manager: started on entry, stopped and joined on exit."""

    def __init__(self, endpoint: str, identity: bytes, frames: list[bytes], expect: int,
                 gap_s: float = 0.0) -> None:
        self._stop = _SPAWN.Event()
        self._sent: Any = _SPAWN.Value("q", 0)
        self._heard_count: Any = _SPAWN.Value("q", 0)
        self._out: multiprocessing.Queue[list[bytes]] = _SPAWN.Queue()
        self.heard: list[bytes] = []
        self.process = _SPAWN.Process(
            target=_run, daemon=True,
            args=(endpoint, identity, frames, expect, gap_s, self._stop, self._sent,
                  self._heard_count, self._out))

    @property
    def sent(self) -> int:
        return int(self._sent.value)

    @property
    def heard_count(self) -> int:
        return int(self._heard_count.value)

    def start(self) -> None:
        self.process.start()

    def __enter__(self) -> Peer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 10.0) -> None:
        """Stop, collect what it heard, and end the process (killed if it hangs)."""
        self._stop.set()
        try:
            self.heard = self._out.get(timeout=timeout)
        except queue.Empty:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def _run(endpoint: str, identity: bytes, frames: list[bytes], expect: int, gap_s: float,
         stop: Any, sent: Any, heard_count: Any, out: multiprocessing.Queue[list[bytes]]
         ) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.SNDHWM, 0)  # a burst is queued whole, never blocks
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    heard: list[bytes] = []
    deadline = time.monotonic() + DEADLINE_S
    done = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            sending = done < len(frames)
            if sending:
                sock.send(frames[done])
                done += 1
                sent.value = done
                if gap_s:
                    time.sleep(gap_s)
            elif len(heard) >= expect:
                stop.wait(DEADLINE_S)  # stay connected until told
                break
            if sock.poll(0 if sending else 10):
                while True:
                    try:
                        heard.append(sock.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                heard_count.value = len(heard)
    finally:
        sock.close(0)
        ctx.term()
        out.put(heard)
