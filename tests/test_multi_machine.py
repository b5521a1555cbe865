"""Several machines as one job, each machine a Linux network namespace with its own address.

Each test creates its machines (megatron_lamina/bench/machines.py: namespaces joined by a
bridge), runs one `lamina` per machine with `--nnodes/--node-rank/--rdzv-endpoint`, and removes
them; every machine but node 0 is started first, so join order never matches node order. The
greedy tokens of every layout must equal the same config on one machine and `transformers`;
the fault tests kill a machine's launcher mid-stream, leave a machine out of the rendezvous,
and resume a batch job that lost a machine. Skipped, with the reason, only where this host
cannot create namespaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import PROMPTS
from tiny_models import reference_generate

from megatron_lamina.bench.machines import Machines, unavailable
from megatron_lamina.requests.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
WHY = unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")
RDZV_PORT = 29500
HTTP_PORT = 8000
MAX_TOKENS = 6


def _config(tmp_path: Path, checkpoint, nodes: list[tuple[str, int]], **sections) -> Path:
    values = {"model": {"checkpoint": str(checkpoint)},
              "parallel": {"attention_head_groups": 1},
              "scheduler": {"micro_batches": 2, "max_batch_size": 16, "max_prefill_tokens": 16},
              "kv_cache": {"block_size": 4, "num_blocks": 64},
              "runtime": {"step_timeout_s": 30},
              "server": {"port": HTTP_PORT},
              "deployment": {"nodes": [{"role": role, "workers": k} for role, k in nodes]}}
    for section, keys in sections.items():
        values[section].update(keys)
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _lines(path: Path, count: int, max_tokens: int = MAX_TOKENS) -> Path:
    prompts = [PROMPTS[i % len(PROMPTS)] + [3 + i] for i in range(count)]
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                                        "ignore_eos": True}) + "\n" for i, p in enumerate(prompts)))
    return path


def _start(machines: Machines, node: int, command: list[str], config: Path, log: Path, *extra: str):
    argv = [sys.executable, "-m", "megatron_lamina.cli", *command, "--config", str(config),
            "--nnodes", str(machines.count), "--node-rank", str(node),
            "--rdzv-endpoint", f"{machines.addresses[0]}:{RDZV_PORT}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return machines.run(node, argv, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _start_all(machines, command, config, tmp_path, *extra, tag=""):
    """Node 0 last: the others join first, so join order is not node order."""
    procs = {}
    for node in [*range(1, machines.count), 0]:
        procs[node] = _start(machines, node, command, config, tmp_path / f"node{node}{tag}.log", *extra)
        time.sleep(0.5)
    return procs


def _log(tmp_path, node, tag="") -> str:
    return (tmp_path / f"node{node}{tag}.log").read_text(errors="replace")


def _wait(procs: dict, timeout: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    codes = {}
    for node, proc in procs.items():
        codes[node] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return codes


def _no_process_left(machines: Machines) -> None:
    deadline = time.monotonic() + 30
    while any(machines.pids(i) for i in range(machines.count)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(machines.pids(i) for i in range(machines.count)), \
        {i: machines.pids(i) for i in range(machines.count)}


def _records(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a record was written twice"
    return {r["id"]: r for r in records}


def _generate(machines, config, tmp_path, lines, out, *extra, tag=""):
    procs = _start_all(machines, ["generate"], config, tmp_path, "--input", str(lines), "--output", str(out),
                       "--quiet", *extra, tag=tag)
    codes = _wait(procs, timeout=600)
    logs = {n: _log(tmp_path, n, tag) for n in procs}
    assert "had not left" not in logs[0], logs[0]  # every machine left before node 0's store closed
    return codes, logs


LAYOUTS = {  # name: (machines' roles and workers, extra parallel keys)
    "tp2-model-node+attention-node-of-2": ([("model", 2), ("attention", 2)], {}),
    "two-attention-nodes-request-shards": ([("model", 1), ("attention", 1), ("attention", 1)], {}),
    "head-groups-split-over-two-nodes": ([("model", 1), ("attention", 1), ("attention", 1)],
                                         {"attention_head_groups": 2}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tokens_across_machines_equal_one_machine_and_transformers(tmp_path, tiny_models, layout):
    model = tiny_models["untied"]
    nodes, parallel = LAYOUTS[layout]
    lines = _lines(tmp_path / "in.jsonl", 6)
    prompts = [json.loads(line)["prompt"] for line in lines.read_text().splitlines()]
    expected, _ = reference_generate(model.hf_dir, prompts, [SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                             ignore_eos=True)] * len(prompts))
    config = _config(tmp_path, model.canonical_dir, nodes, parallel=parallel)
    # The same config on one machine (no deployment section), run meanwhile: its records must be the same.
    one = dict(yaml.safe_load(config.read_text()))
    del one["deployment"]
    one["parallel"].update(tensor_parallel=nodes[0][1], attention_workers=sum(k for _, k in nodes[1:]))
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump(one))
    single_log = tmp_path / "single.log"
    with open(single_log, "w") as log:
        single_job = subprocess.Popen([sys.executable, "-m", "megatron_lamina.cli", "generate", "--config", str(single),
                                       "--input", str(lines), "--output", str(tmp_path / "single.jsonl"), "--quiet"],
                                      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        with Machines(len(nodes)) as machines:
            codes, logs = _generate(machines, config, tmp_path, lines, tmp_path / "out.jsonl")
            assert codes == {n: 0 for n in codes}, logs
            _no_process_left(machines)
        single_code = single_job.wait(timeout=600)
    finally:
        if single_job.poll() is None:
            single_job.kill()
            single_job.wait()
    records = _records(tmp_path / "out.jsonl")
    assert [records[f"r{i}"]["token_ids"] for i in range(len(prompts))] == expected
    # Roles come from the node ranks, not the join order (node 0 joined last): the start-up
    # lines put the model workers on node 0's address and the attention workers after it.
    placed = [line for line in logs[0].splitlines() if "] rank " in line]
    assert len(placed) == sum(k for _, k in nodes), logs[0]
    tp = nodes[0][1]
    for rank, line in enumerate(placed):
        node = 0 if rank < tp else 1 + (rank - tp) // nodes[1][1]
        assert f"node {node}, " in line and machines.addresses[node] in line, line
        assert ("model worker" in line) == (rank < tp), line
    # The same config on one machine gives the same records.
    assert single_code == 0, single_log.read_text()[-3000:]
    assert {k: r["token_ids"] for k, r in _records(tmp_path / "single.jsonl").items()} == \
        {k: r["token_ids"] for k, r in records.items()}


def test_a_machine_that_never_joins_is_named_on_every_machine(tmp_path, tiny_models):
    config = _config(tmp_path, tiny_models["untied"].canonical_dir,
                     [("model", 1), ("attention", 1), ("attention", 1)])
    lines = _lines(tmp_path / "in.jsonl", 2)
    with Machines(3) as machines:
        procs = {node: _start(machines, node, ["generate"], config, tmp_path / f"node{node}.log", "--input",
                              str(lines), "--output", str(tmp_path / "out.jsonl"), "--rdzv-timeout", "5")
                 for node in (1, 0)}  # node 2 never starts
        codes = _wait(procs, timeout=120)
        for node in (0, 1):
            log = _log(tmp_path, node)
            assert codes[node] != 0, log
            errors = [line for line in log.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "node 2 (attention, 1 worker) never joined" in errors[0], log
            assert "Traceback" not in log, log
        _no_process_left(machines)
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()


_CLIENT = """
import json, sys, httpx
url, body = sys.argv[1], json.loads(sys.argv[2])
with httpx.Client(timeout=httpx.Timeout(120.0)) as client:
    for _ in range(600):  # the server listens once every machine is ready
        try:
            if client.get(url + "/v1/models").status_code == 200:
                break
        except httpx.TransportError:
            pass
        import time; time.sleep(0.25)
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        print(json.dumps({"status": response.status_code}), flush=True)
        for line in response.iter_lines():
            if line.startswith("data: "):
                print(json.dumps({"event": line[6:]}), flush=True)
"""


def _stream_in(machines, node, body) -> subprocess.Popen:
    return machines.run(node, [sys.executable, "-c", _CLIENT, f"http://127.0.0.1:{HTTP_PORT}", json.dumps(body)],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


LONG_STREAM = {"model": "canonical", "prompt": [1, 5, 9], "max_tokens": 200, "temperature": 0, "ignore_eos": True,
               "stream": True}


def _serving_mid_stream(machines, config, tmp_path):
    """Both machines serving and a long stream under way on node 0: (launchers, client, events)."""
    procs = _start_all(machines, ["serve"], config, tmp_path)
    client = _stream_in(machines, 0, LONG_STREAM)
    events = []
    for line in client.stdout:  # a few tokens arrived: the job is serving across the machines
        events.append(json.loads(line))
        if len(events) >= 4:
            break
    assert events[0] == {"status": 200}, (events, _log(tmp_path, 0))
    return procs, client, events


def _ends_in_error(client, events) -> None:
    rest = [json.loads(line) for line in client.stdout]
    client.wait(timeout=60)
    last = [e["event"] for e in events[1:] + rest]
    assert last[-1] == "[DONE]" and "error" in json.loads(last[-2]), last[-3:]


def test_an_attention_machine_killed_mid_stream(tmp_path, tiny_models):
    config = _config(tmp_path, tiny_models["untied"].canonical_dir, [("model", 1), ("attention", 2)],
                     kv_cache={"block_size": 4, "num_blocks": 128})
    with Machines(2) as machines:
        procs, client, events = _serving_mid_stream(machines, config, tmp_path)
        os.kill(procs[1].pid, signal.SIGKILL)  # node 1's launcher: its ranks die with it
        _ends_in_error(client, events)
        code = procs[0].wait(timeout=120)
        log = _log(tmp_path, 0)
        assert code == 11, log  # 10 + the lost node's rank
        assert "node 1 (attention, 2 workers)" in log.strip().splitlines()[-1], log
        procs[1].wait(timeout=10)
        _no_process_left(machines)

        # The same commands again serve again; SIGTERM to node 0 drains the job and both exit 0,
        # node 1 first: node 0's launcher, which serves the rendezvous store, waits for it to leave.
        procs = _start_all(machines, ["serve"], config, tmp_path, tag="-again")
        client = _stream_in(machines, 0, dict(LONG_STREAM, max_tokens=5))
        out = [json.loads(line) for line in client.stdout]
        client.wait(timeout=60)
        assert out[0] == {"status": 200} and out[-1] == {"event": "[DONE]"}, out
        assert not any("error" in json.loads(e["event"]) for e in out[1:-1]), out
        os.kill(procs[0].pid, signal.SIGTERM)
        codes = _wait(procs, timeout=120)
        assert codes[1] == 0, _log(tmp_path, 1, "-again")
        assert codes[0] in (0, 128 + signal.SIGTERM), _log(tmp_path, 0, "-again")
        assert "had not left" not in _log(tmp_path, 0, "-again"), _log(tmp_path, 0, "-again")
        _no_process_left(machines)


def test_a_batch_job_that_lost_a_machine_resumes(tmp_path, tiny_models):
    model = tiny_models["untied"]
    config = _config(tmp_path, model.canonical_dir, [("model", 1), ("attention", 2)],
                     scheduler={"micro_batches": 2, "max_batch_size": 2, "max_prefill_tokens": 16})
    lines = _lines(tmp_path / "in.jsonl", 10, max_tokens=24)
    out = tmp_path / "out.jsonl"
    with Machines(2) as machines:
        procs = _start_all(machines, ["generate"], config, tmp_path, "--input", str(lines), "--output", str(out),
                           "--quiet", "--progress-interval", "0")
        deadline = time.monotonic() + 300
        while (not out.exists() or not out.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert out.exists() and out.read_text().strip(), _log(tmp_path, 0)
        os.kill(procs[1].pid, signal.SIGKILL)
        codes = _wait(procs, timeout=120)
        assert codes[0] == 11, _log(tmp_path, 0)
        done_before = _records(out)
        assert 0 < len(done_before) < 10, done_before.keys()
        _no_process_left(machines)

        codes, logs = _generate(machines, config, tmp_path, lines, out, "--resume", tag="-resume")
        assert codes == {0: 0, 1: 0}, logs
        _no_process_left(machines)
    records = _records(out)  # every id once: nothing lost, nothing twice
    assert sorted(records) == sorted(f"r{i}" for i in range(10))
    prompts = [json.loads(line)["prompt"] for line in lines.read_text().splitlines()]
    expected, _ = reference_generate(model.hf_dir, prompts, [SamplingParams(max_tokens=24, temperature=0,
                                                                             ignore_eos=True)] * len(prompts))
    assert [records[f"r{i}"]["token_ids"] for i in range(10)] == expected
    assert all(records[k] == v for k, v in done_before.items())


def test_an_attention_machine_cut_off_mid_stream(tmp_path, tiny_models):
    """Its cable out: no reset reaches anyone. The step times out (runtime.step_timeout_s), the
    stream ends in an error, node 0 names node 1, and node 1, cut off from node 0's store, names
    node 0 and exits; nothing is left on either machine."""
    config = _config(tmp_path, tiny_models["untied"].canonical_dir, [("model", 1), ("attention", 2)],
                     kv_cache={"block_size": 4, "num_blocks": 128}, runtime={"step_timeout_s": 10})
    with Machines(2) as machines:
        procs, client, events = _serving_mid_stream(machines, config, tmp_path)
        machines.cut(1)
        _ends_in_error(client, events)
        assert procs[0].wait(timeout=120) == 11, _log(tmp_path, 0)
        assert "node 1 (attention, 2 workers)" in _log(tmp_path, 0).strip().splitlines()[-1]
        assert procs[1].wait(timeout=120) == 10, _log(tmp_path, 1)
        assert "node 0 (model, 1 worker)" in _log(tmp_path, 1).strip().splitlines()[-1]
        _no_process_left(machines)
