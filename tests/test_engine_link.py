"""The pipe between the engine process and the HTTP front end (engine/engine_link.py).

A step's outputs cross it as tuples and come back as equal `RequestOutput`s (log-probabilities
included); and the front end's side, reading a whole step message, never imports the engine's
heavy modules (Megatron-core): once it did, on the first step message, blocking its event loop
for seconds in the middle of a batch.
"""

from __future__ import annotations

import subprocess
import sys
from multiprocessing import Pipe

from torchrun import ROOT

from megatron_lamina.engine.engine_link import StepReport, StepStats, pack_output, unpack_output
from megatron_lamina.engine.output import RequestOutput
from megatron_lamina.engine.request import TokenLogprob


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


FRONT_END = """
import pickle, sys
from megatron_lamina.engine.engine_link import StepReport, StepStats, pack_output
from megatron_lamina.engine.output import RequestOutput
message = pickle.dumps(("step", [(0, pack_output(RequestOutput(0, "a", [1], False, None, 1, 1)))],
                        StepReport([StepStats(1, 1, 0.1)], 1, 0, 8, [1])))
before = set(sys.modules)
import megatron_lamina.server.frontend, megatron_lamina.server.app, megatron_lamina.server.engine_client
pickle.loads(message)
print(sorted(m for m in sys.modules if m.startswith(("megatron.", "megatron_lamina.engine.llm_engine",
                                                     "megatron_lamina.model", "megatron_lamina.attention"))))
"""


def test_the_front_end_never_imports_the_engines_modules():
    result = subprocess.run([sys.executable, "-c", FRONT_END], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
