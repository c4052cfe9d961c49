"""Which replica was sent which prompt prefix: the memory of the prefix-aware router.

Prompts are cut into blocks of BLOCK_TOKENS tokens, each keyed by a hash chained over every
block before it (as vLLM keys its prefix-cache blocks), so one key names one whole prefix.
For each key the index keeps the replicas that were sent a prompt starting so, and forgets
the least recently used keys past a bound. It estimates what each engine holds in its cache:
engines evict on their own, so a match is a good bet, not a promise. Pure and
single-threaded (the router's event loop), tested without Ray.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence

BLOCK_TOKENS = 16
# Keys kept at most: 100k blocks of 16 tokens is 1.6M prompt tokens remembered, some 20 MB.
MAX_KEYS = 100_000


def block_keys(tokens: Sequence[int], block: int = BLOCK_TOKENS) -> Iterator[int]:
    """One key per whole block of `tokens`, each naming the prefix that ends with it."""
    key = 0
    for start in range(0, len(tokens) - block + 1, block):
        key = hash((key, tuple(tokens[start : start + block])))
        yield key


class PrefixIndex:
    """Prefix keys -> the replicas that were sent them, least recently used forgotten first."""

    def __init__(self, *, max_keys: int = MAX_KEYS, block: int = BLOCK_TOKENS) -> None:
        self.block = block
        self._max_keys = max_keys
        self._holders: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def record(self, replica: str, tokens: Sequence[int]) -> None:
        """`replica` was sent a prompt of these tokens: it holds (or will) their prefixes."""
        for key in block_keys(tokens, self.block):
            holders = self._holders.get(key)
            if holders is None:
                self._holders[key] = {replica}
            else:
                holders.add(replica)
                self._holders.move_to_end(key)
        while len(self._holders) > self._max_keys:
            self._holders.popitem(last=False)

    def longest_match(self, tokens: Sequence[int], among: Collection[str]) -> tuple[set[str], int]:
        """The replicas of `among` holding the longest prefix of `tokens`, and its length in
        tokens (0 and no replica when none holds even the first block)."""
        live = set(among)
        best: set[str] = set()
        matched = 0
        for depth, key in enumerate(block_keys(tokens, self.block), start=1):
            holders = self._holders.get(key)
            found = holders & live if holders else set()
            if not found:
                break
            best, matched = found, depth * self.block
        return best, matched

    def forget(self, replica: str) -> None:
        """A replica has gone: nothing it held is worth routing to any more."""
        for key in list(self._holders):
            holders = self._holders[key]
            holders.discard(replica)
            if not holders:
                del self._holders[key]
