"""The keys of the prefix cache: chained hashes of full KV blocks (driver only).

vLLM's automatic prefix caching keys a full block by a hash of (its parent block's hash, the
block's token ids, extra keys). The chain makes a block's key name its whole prefix, so two
requests share a block only when every token before it and in it is the same. The extra keys
hold what changes the KV beyond the tokens: here the request's `cache_salt` (a tenant's own
cache), folded into the first block and so into every block after it. SHA-256 keeps a forged
collision (one tenant reading another's KV) out of reach; the block manager (block_manager.py)
calls `extend_block_hashes` as a request's known tokens grow.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

# The parent of every request's first block.
ROOT_HASH = hashlib.sha256(b"megatron-lamina prefix cache v1").digest()


def _salt_bytes(salt: str | None) -> bytes:
    """The first block's extra keys: the salt, length-prefixed so no token bytes can imitate it."""
    if salt is None:
        return b"\x00"
    data = salt.encode("utf-8")
    return b"\x01" + len(data).to_bytes(8, "little") + data


def extend_block_hashes(hashes: list[bytes], tokens: Callable[[int, int], list[int]], num_tokens: int,
                        block_size: int, salt: str | None) -> None:
    """Append to `hashes` (the keys of a request's first len(hashes) full blocks) the key of
    every further block that `num_tokens` known tokens fill; `tokens(start, end)` reads them."""
    parent = hashes[-1] if hashes else ROOT_HASH
    first, end = len(hashes), num_tokens // block_size
    # The new blocks' tokens read and made bytes at once, each block a slice: a long prompt's
    # admission is one read and one array, not one of each per block.
    data = np.asarray(tokens(first * block_size, end * block_size), np.int64).tobytes()
    width = 8 * block_size
    for i in range(first, end):
        h = hashlib.sha256(parent)
        if i == 0:
            h.update(_salt_bytes(salt))
        h.update(data[(i - first) * width:(i - first + 1) * width])
        parent = h.digest()
        hashes.append(parent)
