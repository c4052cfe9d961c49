"""Reading a sequence's token chunks as they pile up: a reader that has fallen behind takes
everything already waiting as one chunk, so the layers above it (the process hop, the
detokenizer, response shaping) do their per-chunk work once, not once per token."""

from __future__ import annotations

import asyncio
from collections import deque

from vllm_obtain.contract.data import TokenChunk

# What a sequence's stream carries: a chunk, or the error that ended it.
StreamItem = TokenChunk | BaseException


def merge_chunks(first: TokenChunk, more: list[TokenChunk]) -> TokenChunk:
    """Consecutive chunks of one sequence as one (the last one's finish reason, if any)."""
    if not more:
        return first
    chunks = [first, *more]
    return TokenChunk(
        tuple(t for c in chunks for t in c.token_ids),
        b"".join(c.piece for c in chunks),
        chunks[-1].finish_reason,
        tuple(lp for c in chunks for lp in c.logprobs),
    )


class ChunkQueue:
    """One sequence's outputs: chunks, or the error that ended it (put after the chunks before
    it, and delivered after them)."""

    def __init__(self) -> None:
        self._arrived: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._backlog: deque[StreamItem] = deque()

    def put(self, item: StreamItem) -> None:
        self._arrived.put_nowait(item)

    async def get(self) -> StreamItem:
        """The next output; consecutive chunks already waiting come merged."""
        if not self._backlog:
            self._backlog.append(await self._arrived.get())
        while not self._arrived.empty():
            self._backlog.append(self._arrived.get_nowait())
        item = self._backlog.popleft()
        if not isinstance(item, TokenChunk) or item.finish_reason is not None:
            return item
        more: list[TokenChunk] = []
        while self._backlog and isinstance(self._backlog[0], TokenChunk):
            chunk = self._backlog.popleft()
            assert isinstance(chunk, TokenChunk)
            more.append(chunk)
            if chunk.finish_reason is not None:
                break
        return merge_chunks(item, more)
