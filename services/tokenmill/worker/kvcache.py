"""The KV cache's blocks: a fixed pool, per-sequence block tables, and the prefix cache.

Every block holds `block_size` positions of every layer's keys and values. A block that is full
is named by a hash of its tokens and of the block before it (so equal hashes mean equal whole
prefixes); a later sequence whose prompt starts with the same blocks takes them by reference
instead of computing them again. A block nobody references any more keeps its KV and its name
until the pool needs the room: such blocks are evicted least recently used first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field


class OutOfBlocks(Exception):
    """The pool has no free or evictable block left."""


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The name of a full block: it covers the whole prefix up to the block's end."""
    digest = hashlib.sha256(parent)
    digest.update(b",".join(str(t).encode() for t in token_ids))
    return digest.digest()


ROOT_HASH = b""


@dataclass
class BlockTable:
    """One sequence's blocks, in position order, and the hashes of its full blocks."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)

    @property
    def parent_hash(self) -> bytes:
        return self.hashes[-1] if self.hashes else ROOT_HASH


class BlockPool:
    """`num_blocks` blocks, each free, referenced by sequences, or cached and evictable."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._cached: dict[bytes, int] = {}
        # Unreferenced blocks that still hold a named prefix, least recently used first.
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def available(self) -> int:
        """Blocks a sequence could take now: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1 - self.available / self.num_blocks

    def match_prefix(self, table: BlockTable, token_ids: list[int], limit_tokens: int) -> int:
        """Take the cached blocks that start `token_ids` (at most `limit_tokens` tokens of
        them) into the empty `table`; return how many tokens they cover."""
        assert not table.blocks
        whole = min(len(token_ids), limit_tokens) // self.block_size
        if not self.prefix_caching:
            return 0
        for index in range(whole):
            chunk = token_ids[index * self.block_size : (index + 1) * self.block_size]
            name = block_hash(table.parent_hash, chunk)
            block = self._cached.get(name)
            if block is None:
                break
            self._take(block)
            table.blocks.append(block)
            table.hashes.append(name)
        return len(table.blocks) * self.block_size

    def grow(self, table: BlockTable, positions: int) -> None:
        """Give `table` enough blocks for `positions` positions, all or none."""
        needed = -(-positions // self.block_size) - len(table.blocks)
        if needed > self.available:
            raise OutOfBlocks(f"{needed} blocks needed, {self.available} available")
        for _ in range(max(0, needed)):
            table.blocks.append(self._allocate())

    def seal_full_blocks(self, table: BlockTable, token_ids: list[int], computed: int) -> None:
        """Name every block of `table` whose positions are now all computed, so later
        sequences can share it."""
        while len(table.hashes) < computed // self.block_size:
            index = len(table.hashes)
            chunk = token_ids[index * self.block_size : (index + 1) * self.block_size]
            name = block_hash(table.parent_hash, chunk)
            table.hashes.append(name)
            block = table.blocks[index]
            # A twin computed meanwhile by another sequence keeps the name; ours stays unnamed
            # and returns to the free list when released.
            if self.prefix_caching and name not in self._cached:
                self._cached[name] = block
                self._hash_of[block] = name

    def release(self, table: BlockTable) -> None:
        """Drop `table`'s references; its named blocks stay cached until evicted."""
        # Last blocks first into the LRU, so a prefix's head outlives its tail.
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            assert self._refs[block] >= 0
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        table.blocks.clear()
        table.hashes.clear()

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def _allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
        assert self._refs[block] == 0
        self._refs[block] = 1
        return block
