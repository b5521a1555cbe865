"""The pipe between the engine process and the HTTP front end (requests/engine_link.py).

A step's outputs cross it as tuples and come back as equal `RequestOutput`s (log-probabilities
included). The front end's `EngineClient`, on the event loop the server runs (uvloop), sends a
flood of requests that overfills the pipe while the engine reads nothing, and every one of
them arrives once the engine reads (the pipe's descriptor was once made non-blocking by the
event loop, and the first full pipe silently ended the sender: every later request hung);
a step message sent back reaches its request's outputs. And the front end, reading a whole step
message, never imports the engine's heavy modules (Megatron-core): once it did, on the first
step message, blocking its event loop for seconds in the middle of a batch.
"""

from __future__ import annotations

import subprocess
import sys
import asyncio
from multiprocessing import Pipe

import pytest
from torchrun import ROOT

from megatron_lamina.requests.engine_link import EngineInfo, StepReport, StepStats, pack_output, unpack_output
from megatron_lamina.requests.output import RequestOutput
from megatron_lamina.requests.prompt import Capacity, PromptInput
from megatron_lamina.requests.output import TokenLogprob


def test_outputs_cross_the_pipe_unchanged():
    outputs = [RequestOutput(7, "héllo", [5, 6], False, None, 12, 2,
                             logprobs=[TokenLogprob(-0.5, [(5, -0.5), (9, -1.25)]), TokenLogprob(-2.0, [])]),
               RequestOutput(8, "", [], True, "error", 3, 0, error="the engine failed: x",
                             prompt_logprobs=[None, TokenLogprob(-1.0, [(1, -1.0)])])]
    ours, theirs = Pipe()
    ours.send(("step", [(k, pack_output(o)) for k, o in enumerate(outputs)],
               StepReport([StepStats(2, 9, 0.01, 0.008, 0.011)], 1, 0, 64, [3])))
    kind, packed, report = theirs.recv()
    assert kind == "step" and [unpack_output(p) for _, p in packed] == outputs
    assert report.steps[0].gpu_s == 0.008 and report.blocks_used == [3]


def test_a_flood_of_requests_waits_for_the_engine_and_arrives_whole():
    uvloop = pytest.importorskip("uvloop")  # what uvicorn runs the front end on (the serve extra)
    from megatron_lamina.server.engine_client import EngineClient
    from megatron_lamina.server.metrics import ServerMetrics

    engine_end, front_end = Pipe()
    ready = asyncio.Event()
    client = EngineClient(front_end, None, 10**6, ServerMetrics(), 60.0, on_ready=lambda info: ready.set())
    prompt = list(range(2000))  # ~8 KB pickled: 300 of them are several times a pipe's buffer

    def engine_reads(count: int) -> list:
        adds = []
        while len(adds) < count and engine_end.poll(30):
            adds += engine_end.recv()[1]
        return adds

    async def run():
        client.attach(asyncio.get_running_loop())
        engine_end.send(("ready", EngineInfo(Capacity(10**6, 10**6, 16), 50_000, 0)))
        await asyncio.wait_for(ready.wait(), 30)
        outputs = [client.generate_all([PromptInput(prompt_token_ids=prompt)])[0] for _ in range(300)]
        await asyncio.sleep(1.0)  # the sender meets a full pipe meanwhile: it must wait, not fail
        adds = await asyncio.to_thread(engine_reads, 300)
        assert [key for key, _ in adds] == [o.key for o in outputs]
        assert all(item.prompt_token_ids == prompt for _, item in adds)
        done = RequestOutput(0, "w", [7], True, "length", 2000, 1)
        engine_end.send(("step", [(outputs[5].key, pack_output(done))], None))
        assert await asyncio.wait_for(outputs[5].__anext__(), 30) == done
        client.detach()

    uvloop.run(run())


FRONT_END = """
import pickle, sys
from megatron_lamina.requests.engine_link import StepReport, StepStats, pack_output
from megatron_lamina.requests.output import RequestOutput
message = pickle.dumps(("step", [(0, pack_output(RequestOutput(0, "a", [1], False, None, 1, 1)))],
                        StepReport([StepStats(1, 1, 0.1)], 1, 0, 8, [1])))
before = set(sys.modules)
import megatron_lamina.server.frontend, megatron_lamina.server.app, megatron_lamina.server.engine_client
pickle.loads(message)
print(sorted(m for m in sys.modules if m.startswith(("megatron.", "megatron_lamina.driver.llm_engine",
                                                     "megatron_lamina.model", "megatron_lamina.attention"))))
"""


def test_the_front_end_never_imports_the_engines_modules():
    result = subprocess.run([sys.executable, "-c", FRONT_END], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
