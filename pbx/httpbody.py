"""Reading an HTTP answer from a server we do not control, within a budget.

The executor calls servers a provider names (its own step URL, any `api` action URL),
and a TTS or ASR service: each may stream an endless body within its timeout. What one
answer may take in memory is capped; past it, `BodyTooLarge` (each caller turns that
into its own error result)."""

from __future__ import annotations

import aiohttp

CHUNK_BYTES = 65536


class BodyTooLarge(Exception):
    pass


async def read_capped(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The body of `resp`, at most `limit` bytes; `BodyTooLarge` ("`what` larger than
    `limit` bytes") as soon as it is known to be more, before reading it all."""
    if resp.content_length is not None and resp.content_length > limit:
        raise BodyTooLarge(f"{what} larger than {limit} bytes")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"{what} larger than {limit} bytes")
    return bytes(body)
