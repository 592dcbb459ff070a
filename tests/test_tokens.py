"""pbx.tokens: random identifiers from the CSPRNG read in blocks."""

from __future__ import annotations

import os
import re

import pytest

from pbx import tokens
from pbx.calls import inbound
from pbx.sip import message


def test_tokens_are_hex_of_the_asked_size_and_never_repeat() -> None:
    seen = {tokens.token_hex(8) for _ in range(20_000)}  # ~40 blocks
    assert len(seen) == 20_000
    assert all(re.fullmatch(r"[0-9a-f]{16}", t) for t in seen)
    assert len(tokens.token_bytes(tokens.BLOCK_BYTES + 1)) == tokens.BLOCK_BYTES + 1
    assert len(tokens.token_hex(3)) == 6


def test_one_urandom_read_serves_a_block_of_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        reads.append(n)
        return real(n)

    monkeypatch.setattr(tokens.os, "urandom", urandom)
    monkeypatch.setattr(tokens, "_block", b"")
    parts = [tokens.token_bytes(8) for _ in range(tokens.BLOCK_BYTES // 8 * 2)]
    assert reads == [tokens.BLOCK_BYTES, tokens.BLOCK_BYTES]
    # Every byte of the blocks handed out once, in order: nothing reused.
    assert len(set(parts)) == len(parts)


def test_a_forked_child_never_hands_out_the_parents_bytes() -> None:
    tokens.token_hex(8)  # the parent has a block with bytes left
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next token, to the parent
        try:
            os.write(write_end, tokens.token_hex(8).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{16}", child)
    assert child != tokens.token_hex(8)


def test_call_ids_tags_and_branches_come_from_the_block(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    asked: list[int] = []
    real = tokens.token_hex

    def token_hex(n: int) -> str:
        asked.append(n)
        return real(n)

    monkeypatch.setattr(message, "token_hex", token_hex)
    monkeypatch.setattr(inbound, "token_hex", token_hex)
    assert message.new_branch().startswith(message.MAGIC_COOKIE)
    assert len(message.new_tag()) == 12
    assert message.new_call_id("h").endswith("@h")
    assert asked == [10, 6, 12]
