"""The warm ranks the tests' jobs run on (bench/ranks.RankPool, tests/spawn_ranks.run_ranks):
jobs of different world sizes run on the same processes (rank r is always the same one, the
pool grows to the largest world), each job sees the caller's environment as it is when the
job is sent, a failed job raises with the failing rank's traceback and the next job runs on
fresh ranks, and closing the pool ends its processes."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist
from server_proc import wait_gone

from megatron_lamina.bench.ranks import RankPool

VARIABLE = "LAMINA_RANK_POOL_TEST"


def _world() -> tuple[int, list[tuple[int, str | None]]]:
    """(world size, every rank's (pid, VARIABLE)), through a real gloo collective."""
    dist.init_process_group("gloo")
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (os.getpid(), os.environ.get(VARIABLE)))
    return dist.get_world_size(), seen


def _fail_on(rank: int) -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == rank:
        raise ValueError(f"rank {rank} was told to fail")
    dist.barrier()  # the others wait in a collective that never completes


def test_jobs_share_warm_ranks_and_a_failure_renews_them(monkeypatch):
    pool = RankPool()
    try:
        monkeypatch.setenv(VARIABLE, "first")
        world, first = pool.run(_world, 2)
        assert world == 2 and [value for _, value in first] == ["first", "first"]
        monkeypatch.setenv(VARIABLE, "second")  # after the ranks were spawned
        world, second = pool.run(_world, 3)
        assert world == 3 and [value for _, value in second] == ["second"] * 3
        assert [pid for pid, _ in second[:2]] == [pid for pid, _ in first]  # the same processes
        assert len({pid for pid, _ in second}) == 3 and os.getpid() not in {pid for pid, _ in second}

        with pytest.raises(RuntimeError, match=r"(?s)rank 1:.*ValueError: rank 1 was told to fail"):
            pool.run(_fail_on, 3, 1, timeout=120)
        assert wait_gone([pid for pid, _ in second], timeout=10) == []  # the pool was ended
        world, fresh = pool.run(_world, 2)
        assert world == 2 and not {pid for pid, _ in fresh} & {pid for pid, _ in second}
    finally:
        pool.close()
    assert wait_gone([pid for pid, _ in fresh], timeout=10) == []
