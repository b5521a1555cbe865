"""KV block allocation per request shard (driver only; DESIGN.md section 6).

One free list per attention shard (every shard's cache has the same number of blocks). The
block manager is the only writer of block tables: it places a new request on the shard with
the most free blocks, grows a request's table as its context grows, and frees it when the
request finishes or is preempted.
"""

from __future__ import annotations

from megatron_lamina.engine.request import Request


class BlockManager:
    def __init__(self, num_shards: int, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: list[list[int]] = [list(range(num_blocks - 1, -1, -1)) for _ in range(num_shards)]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_free(self, shard: int) -> int:
        return len(self.free[shard])

    def emptiest_shard(self) -> int:
        return max(range(len(self.free)), key=lambda s: (len(self.free[s]), -s))

    def can_grow(self, request: Request, context_len: int) -> bool:
        extra = self.blocks_needed(context_len) - len(request.block_table)
        return extra <= len(self.free[request.shard])

    def grow(self, request: Request, context_len: int) -> None:
        """Make the request's block table cover `context_len` tokens."""
        assert self.can_grow(request, context_len)
        while len(request.block_table) < self.blocks_needed(context_len):
            request.block_table.append(self.free[request.shard].pop())

    def release(self, request: Request) -> None:
        self.free[request.shard].extend(reversed(request.block_table))
        request.block_table = []
