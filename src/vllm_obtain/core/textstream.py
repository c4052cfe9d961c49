"""Turn a stream of token bytes into client-safe text: whole UTF-8 characters, stop strings cut.

Two things must never reach a client: half of a multi-byte character (a token may end inside
one), and any part of a stop string (which may be split across several tokens). Both are solved
by holding text back until it is known to be safe.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def stop_prefix_overlap(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """Incremental detokenizer for one sequence.

    Feed it the bytes of each new token; it returns the text that may be sent now. When a stop
    string appears, `stopped` becomes true and the text before the stop is the last thing returned.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._pending = ""  # decoded text held back because it may begin a stop string
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text now safe to emit."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended: flush what was held back. The first bytes of a character the
        end cut off (max_tokens can) are dropped, not shown as U+FFFD."""
        if self.stopped:
            return ""
        self._decoder.reset()
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        text = self._pending
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        keep = 0 if final else stop_prefix_overlap(text, self._stops)
        self._pending = text[len(text) - keep :]
        return text[: len(text) - keep]

    def _first_stop(self, text: str) -> int | None:
        positions = [pos for stop in self._stops if (pos := text.find(stop)) != -1]
        return min(positions) if positions else None
