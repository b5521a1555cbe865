"""Shared fixtures: tiny LLaMA checkpoints (HF and converted) and their HF reference outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Idle OpenMP threads sleep instead of spinning: on the 2 shared cores an in-process model's
# second thread otherwise burns a core while it waits for the other, busy with a server rank
# or another job. The thread count, so the arithmetic, is unchanged. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter (test_triton_prefill.py). It must
# be switched on before anything imports triton, which collecting other tests does (through
# attention/gpu.py); torch's CPU compiler does not use Triton, so nothing else changes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The reference is transformers' own PyTorch code: no layer swapped for a Hub kernel, which
# transformers >= 5.25 does by default (and fails to, where the `kernels` package is absent).
os.environ.setdefault("USE_HUB_KERNELS", "0")

ROOT = Path(__file__).resolve().parents[1]

from megatron_lamina.requests.sampling_params import SamplingParams  # noqa: E402
from tiny_models import one_thread, reference_generate, save_tiny_llama  # noqa: E402

from megatron_lamina.checkpoint.default_model import smollm2_gguf_path  # noqa: E402

PROMPTS = [[1, 5, 9, 14, 3], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [1, 77], [1, 8, 100, 200, 31, 7, 7, 7]]
MAX_TOKENS = 6
# Each prompt once greedy and once with seeded sampling, all in one batch.
REQUESTS = [(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)) for p in PROMPTS] + [
    (p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.9, top_k=40, seed=100 + i, ignore_eos=True))
    for i, p in enumerate(PROMPTS)
]


class TinyModel:
    def __init__(self, hf_dir: Path, canonical_dir: Path):
        self.hf_dir, self.canonical_dir = hf_dir, canonical_dir
        self.tokens, self.logits = reference_generate(hf_dir, *zip(*REQUESTS))


@pytest.fixture(scope="session", params=["untied", "tied"])
def tiny_model(request, tmp_path_factory) -> TinyModel:
    return _tiny(tmp_path_factory, request.param == "tied")


_CACHE: dict[bool, TinyModel] = {}


def _tiny(tmp_path_factory, tied: bool) -> TinyModel:
    if tied not in _CACHE:
        from megatron_lamina.checkpoint.convert import convert_checkpoint

        base = tmp_path_factory.mktemp("tied" if tied else "untied")
        hf_dir = save_tiny_llama(base / "hf", tied=tied)
        canonical = convert_checkpoint("hf", hf_dir, base / "canonical", dtype="float32")
        _CACHE[tied] = TinyModel(hf_dir, Path(canonical))
    return _CACHE[tied]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, TinyModel]:
    return {"untied": _tiny(tmp_path_factory, False), "tied": _tiny(tmp_path_factory, True)}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(transformers model loaded from the GGUF, canonical dir converted by the tool). The tool runs in a subprocess while this
    process loads the reference, so the two ~20 s jobs overlap; one intra-op thread each, or
    their idle OpenMP threads spin on the other's cores."""
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    out = tmp_path_factory.mktemp("smollm2") / "canonical"
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    log = out.parent / "convert.log"  # a file, not a pipe: a full pipe would stall the tool
    with open(log, "w") as log_file:
        conversion = subprocess.Popen(
            tool + ["--source", "gguf", "--input", str(gguf), "--output", str(out), "--dtype", "float32"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        try:
            with one_thread():
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        finally:
            conversion.wait(timeout=300)
    assert conversion.returncode == 0, log.read_text()[-2000:]
    return model.eval(), out


# The shared tiny server's API key and CORS origin (test_openai_client.py checks both).
API_KEY = "test-key"
ORIGIN = "https://eval.example"


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_models):
    """The one server of the tiny model (torchrun, 3 ranks: 1 model worker, 2 attention workers,
    2 micro-batches; an API key and a CORS origin) for every test that only sends it requests
    (test_server.py, test_openai_client.py): one start-up, where each rank imports torch,
    Megatron and transformers, for them all. Idle, it takes next to no CPU. Tests that kill,
    drain or reconfigure a server start their own."""
    from server_proc import running_server, tiny_server_config

    tmp = tmp_path_factory.mktemp("tiny-server")
    config, port = tiny_server_config(tmp, tiny_models["untied"].canonical_dir,
                                      server={"api_key": API_KEY, "cors_origins": [ORIGIN]})
    with running_server(config, port, 3, tmp / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def frameworks(tmp_path_factory, tiny_models):
    """Megatron and DeepSpeed checkpoints saved by the real libraries, converted and served
    (checkpoint_fixtures.FrameworkCheckpoints); shared by both framework test modules."""
    from checkpoint_fixtures import FrameworkCheckpoints

    return FrameworkCheckpoints(tmp_path_factory.mktemp("frameworks"), tiny_models)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): a worker per core, at most 4. Two on CI's 2 cores: about
    a third of a test's time is spent waiting (a server starting, a timeout running out), which
    the other worker's test fills; more than 4 would hold that many servers' ranks in memory.
    On a machine with a GPU, none (the tests in this process): they would share the one GPU."""
    if torch.cuda.is_available():
        return 0
    return max(1, min(4, os.cpu_count() or 1))


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with whole files as the unit: a test file runs on one worker (its
    module-scoped server starts once), and files marked `pytest.mark.xdist_group(name)` run on
    the same worker as each other, since they share a costly session fixture (`smollm2`,
    `frameworks`, `tiny_server`) that each worker would otherwise build again."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FilesAndGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid.rsplit("@", 1)[-1] if "@" in nodeid else nodeid.split("::", 1)[0]

    return FilesAndGroups(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the end of the log of every server it started or used (a module's
    shared server too): what a CI failure report otherwise lacks."""
    from server_proc import LIVE_LOGS, LOGS_OF_THIS_TEST

    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for log in dict.fromkeys(LOGS_OF_THIS_TEST + LIVE_LOGS):
            if log.exists():
                report.sections.append((f"server log {log.name}", log.read_text(errors="replace")[-4000:]))
    if report.when == "teardown":
        LOGS_OF_THIS_TEST.clear()

