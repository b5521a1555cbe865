"""This machine's ranks under torch elastic's agent, with an exit barrier that holds no job up.

`run_agent` does what `torch.distributed.launcher.elastic_launch` does with a `LaunchConfig`
(build the rendezvous handler, the worker spec and a `LocalElasticAgent`, run it, raise
`ChildFailedError` when a rank failed, close the rendezvous unless a signal stopped the
agent) but for the agent's exit barrier, which elastic_launch fixes at 300 s: there, an agent
whose ranks succeeded waits for every other machine's agent to succeed too. An agent stopped
by a signal or by its ranks' failure never comes, so after SIGTERM to node 0 (which drains
the job and releases every rank cleanly) the other machines sat in the barrier while node 0's
launcher waited for them to leave, until it gave up and took the store away. The barrier
exists so that an agent hosting the store does not leave before the others; here node 0's
launcher serves the store and keeps it until every other machine left or was lost
(`roll_call.py`), so the barrier gets EXIT_BARRIER_S, enough for agents whose ranks end
together to pass it together. One that times out goes on to close the rendezvous and
leave, as it would have anyway.
"""

from __future__ import annotations

EXIT_BARRIER_S = 1.0


def run_agent(config, entrypoint: str, args: list[str]) -> None:
    """Run `entrypoint *args` on this machine's `config.nproc_per_node` ranks (a torch
    `LaunchConfig`) until they end. Raises ChildFailedError (a rank failed), SignalException
    (this process was signalled; the ranks were stopped) or RendezvousError."""
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    rendezvous = get_rendezvous_handler(RendezvousParameters(
        backend=config.rdzv_backend, endpoint=config.rdzv_endpoint, run_id=config.run_id,
        min_nodes=config.min_nodes, max_nodes=config.max_nodes, local_addr=config.local_addr,
        **config.rdzv_configs))
    spec = WorkerSpec(role=config.role, local_world_size=config.nproc_per_node, entrypoint=entrypoint,
                      args=tuple(args), rdzv_handler=rendezvous, max_restarts=config.max_restarts,
                      monitor_interval=config.monitor_interval, local_addr=config.local_addr,
                      numa_options=config.numa_options)
    agent = LocalElasticAgent(spec, logs_specs=config.logs_specs, start_method=config.start_method,
                              exit_barrier_timeout=EXIT_BARRIER_S, shutdown_timeout=config.shutdown_timeout)
    signalled = False
    try:
        result = agent.run()
    except SignalException:
        signalled = True  # as torch's launcher: a signalled agent leaves the rendezvous as it is
        raise
    finally:
        if not signalled:
            rendezvous.shutdown()
    if result.is_failed():
        raise ChildFailedError(name=entrypoint, failures=result.failures)
