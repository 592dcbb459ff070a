"""Unpredictable identifiers for every call (our call ids, SIP tags, branches, Call-IDs)
from the OS's CSPRNG, read in blocks.

`secrets.token_hex` reads `os.urandom` once per token: a `getrandom()` syscall of
~3.7 µs on this VM, two to four per call in the front (issue 9). `token_hex` here
reads `BLOCK_BYTES` at a time and hands each byte out once, in order. That is as
unpredictable as `secrets.token_hex`: the bytes come from the same kernel CSPRNG, which
gives no relation between bytes of one read that it does not give between reads, and
no byte is ever handed out twice:

* a forked child starts with an empty block (`os.register_at_fork`), so a parent and
  its child never give out the same bytes;
* the lock makes taking a slice atomic across threads (the retention sweep and the
  executor's threads share the process);
* bytes not yet handed out sit in the process's memory, where the identifiers made of
  them end up anyway: whoever can read one can read the other.
"""

from __future__ import annotations

import os
import threading

# One syscall per ~400 call ids (8 bytes) or ~340 tags (12 hex digits).
BLOCK_BYTES = 4096

_lock = threading.Lock()
_block = b""
_used = 0


def token_bytes(nbytes: int) -> bytes:
    """`nbytes` random bytes, as `secrets.token_bytes(nbytes)`."""
    global _block, _used
    if nbytes > BLOCK_BYTES:
        return os.urandom(nbytes)
    with _lock:
        end = _used + nbytes
        if end > len(_block):
            _block = os.urandom(BLOCK_BYTES)
            end = nbytes
            start = 0
        else:
            start = _used
        _used = end
        return _block[start:end]


def token_hex(nbytes: int) -> str:
    """`nbytes` random bytes in hex (2 digits a byte), as `secrets.token_hex(nbytes)`."""
    return token_bytes(nbytes).hex()


def _forget_block() -> None:
    """In a forked child: a block of its own, never the parent's bytes (and a fresh lock:
    the parent's may have been held by another thread at the fork)."""
    global _lock, _block, _used
    _lock = threading.Lock()
    _block = b""
    _used = 0


os.register_at_fork(after_in_child=_forget_block)
