"""The planner's simulator, cost tables, traces and search (megatron_lamina/planner/).

The simulator runs on constant cost tables (small integers as seconds), where the engine's
timing has closed forms: a lone request's TTFT is its prefill step(s) and its end-to-end
time adds one decode step per further token; a constant batch decodes `batch` tokens per
step; the disaggregated step is pipeline.uniform_step_time for 1..4 micro-batches. The
simulator drives the engine's own Scheduler; that it drives it as the engine's driver does
(arrivals, tokens, stop rules, the scheduler's own endings) is checked step by step against
the real LLMEngine on a stand-in worker, preemptions and both `length` endings included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_lamina.planner.cost_table import CostTable, Curve, Grid, prefill_pairs
from megatron_lamina.planner.devices import DeviceSpec, load_prices
from megatron_lamina.planner.layout import Layout, config_yaml, kv_blocks_per_cache
from megatron_lamina.planner.link import LINKS, Link, choose_link
from megatron_lamina.planner.pipeline import uniform_step_time
from megatron_lamina.planner.search import SearchSpace, Slo, search
from megatron_lamina.planner.shapes import PRESETS, ModelShape
from megatron_lamina.planner.simulator import EngineSimulator, StepCostModel, simulate
from megatron_lamina.planner.synthetic import synthetic_cost_table
from megatron_lamina.planner.trace import TraceRequest, read_trace, select

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
SHAPE = ModelShape("test", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_context=4096)
L = SHAPE.num_layers
M, A_DECODE, A_PREFILL, OVERHEAD, NET = 3.0, 2.0, 5.0, 7.0, 1.0


def constant_table(device="X", model=M, decode=A_DECODE, prefill=A_PREFILL, overhead=OVERHEAD, network=NET):
    return CostTable(device, "synthetic: constant test costs", SHAPE, "bfloat16",
                     model_layer={1: Curve([1.0], [model])}, step_overhead={1: Curve([1.0], [overhead])},
                     attention_decode=Grid([1.0], [1.0], [[decode]]), attention_prefill=Curve([1.0], [prefill]),
                     network=Curve([1.0], [network]))


def colocated(n=1, batch=16, prefill_tokens=64):
    return Layout("X", 1, None, 0, 1, n, batch, prefill_tokens, 16)


def disaggregated(n, batch=16, prefill_tokens=64):
    return Layout("X", 1, "X", 1, 1, n, batch, prefill_tokens, 16)


def run(trace, layout, decode_only=False, blocks=1000, table=None):
    table = table or constant_table()
    return simulate(trace, layout, SHAPE, table, None if layout.colocated else table, blocks,
                    decode_only=decode_only)


# ------------------------------------------------------------------ closed-form cases

PREFILL_STEP = L * (M + A_PREFILL) + OVERHEAD   # colocated, one prefill chunk
DECODE_STEP = L * (M + A_DECODE) + OVERHEAD     # colocated, decode (the table is constant in batch)


def test_one_request_alone():
    result = run([TraceRequest(0.0, 40, 10)], colocated())
    assert result.completed == 1 and result.steps == 10
    assert result.ttft_s["p50"] == PREFILL_STEP
    assert result.e2e_s["p50"] == PREFILL_STEP + 9 * DECODE_STEP
    assert result.tpot_s["p50"] == DECODE_STEP
    assert result.duration_s == PREFILL_STEP + 9 * DECODE_STEP and result.output_tokens == 10


def test_one_request_alone_with_chunked_prefill_and_a_late_arrival():
    # 100 prompt tokens under a 64-token budget: two prefill steps, the first samples nothing.
    result = run([TraceRequest(5.0, 100, 3)], colocated(prefill_tokens=64))
    assert result.ttft_s["p50"] == 2 * PREFILL_STEP
    assert result.e2e_s["p50"] == 2 * PREFILL_STEP + 2 * DECODE_STEP


def test_one_request_alone_disaggregated():
    # One request is one micro-batch whatever `micro_batches` says: L round trips.
    result = run([TraceRequest(0.0, 40, 5)], disaggregated(n=3))
    decode = L * (M + A_DECODE + 2 * NET) + OVERHEAD
    assert result.ttft_s["p50"] == L * (M + A_PREFILL + 2 * NET) + OVERHEAD
    assert result.tpot_s["p50"] == decode


def test_constant_batch():
    batch, out = 8, 10
    trace = [TraceRequest(0.0, 40, out)] * batch
    result = run(trace, colocated(batch=batch, prefill_tokens=batch * 40))
    prefill = L * (M + batch * A_PREFILL) + OVERHEAD  # one micro-batch, eight prefill chunks
    assert result.steps == out and result.mean_batch == batch
    assert result.duration_s == prefill + (out - 1) * DECODE_STEP
    assert result.output_tokens == batch * out
    assert result.tpot_s["max"] == result.tpot_s["p50"] == DECODE_STEP
    # Decode only (the paper's setting): every step decodes the whole batch.
    result = run(trace, colocated(batch=batch), decode_only=True)
    assert result.output_throughput == batch / DECODE_STEP
    assert result.duration_s == out * DECODE_STEP


def test_colocated_layouts_run_one_micro_batch():
    """Colocated, each micro-batch would only add a pass over the weights (nothing to overlap),
    so the engine runs one whatever scheduler.micro_batches says, and the simulator with it."""
    trace = [TraceRequest(0.0, 40, 10)] * 12
    for n in (1, 2, 3, 4):
        result = run(trace, colocated(n=n, batch=12), decode_only=True)
        assert result.tpot_s["p50"] == L * (M + A_DECODE) + OVERHEAD


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("costs", [(10.0, 3.0, 1.0), (3.0, 10.0, 1.0), (3.0, 4.0, 20.0)],
                         ids=["model-bound", "attention-bound", "latency-bound"])
def test_pipelined_constant_batch(n, costs):
    model, attention, net = costs
    table = constant_table(model=model, decode=attention, network=net)
    batch, out = 12, 6
    result = run([TraceRequest(0.0, 40, out)] * batch, disaggregated(n, batch=batch), decode_only=True, table=table)
    step = uniform_step_time(L, n, model, attention, 2 * net) + OVERHEAD
    assert result.tpot_s["p50"] == result.tpot_s["max"] == step
    assert result.output_throughput == batch / step


def test_the_link_model_sets_the_exchange_time():
    """Each exchange message costs the link's latency plus its bytes over the bandwidth: a lone
    request's decode step pays one round trip per layer, so NCCL's 66.6 us against host-bypassed
    RDMA's 33 us (the paper's figures) adds 2 x 33.6 us per layer, and halving the bandwidth
    doubles the bytes' share. Without a link the cost table's network curve is used (NET)."""
    send, reply = SHAPE.attention_in_bytes_per_token(2), SHAPE.attention_out_bytes_per_token(2)
    rdma, nccl = LINKS["rdma"], LINKS["nccl"]
    assert (rdma.latency_us, nccl.latency_us, rdma.bandwidth_gbps) == (33.0, 66.6, 400.0)
    assert rdma.message_time(send) == pytest.approx(33e-6 + send * 8 / 400e9, rel=1e-12)
    slow = choose_link("rdma", bandwidth_gbps=200, latency_us=0)
    assert slow.message_time(send) == pytest.approx(2 * choose_link("rdma", latency_us=0).message_time(send), rel=1e-12)
    assert "overridden" in slow.source and choose_link("table") is None

    def decode_step(link):
        table = constant_table()
        result = simulate([TraceRequest(0.0, 40, 5)], disaggregated(n=1), SHAPE, table, table, 1000, link=link)
        return result.tpot_s["p50"]

    assert decode_step(None) == L * (M + A_DECODE + 2 * NET) + OVERHEAD
    for link in (rdma, nccl, slow):
        round_trip = link.message_time(send) + link.message_time(reply)
        assert decode_step(link) == pytest.approx(L * (M + A_DECODE + round_trip) + OVERHEAD, rel=1e-12)
    assert decode_step(nccl) - decode_step(rdma) == pytest.approx(L * 2 * 33.6e-6, rel=1e-6)
    with pytest.raises(ValueError, match="presets: rdma, nccl, tcp"):
        choose_link("infiniband")
    with pytest.raises(ValueError, match="--link table keeps"):
        choose_link("table", latency_us=5)
    with pytest.raises(ValueError, match=r"bandwidth 0 Gb/s must be > 0 \(--link-bandwidth-gbps\)"):
        choose_link("rdma", bandwidth_gbps=0)


def test_kv_capacity_bounds_the_batch_and_preempts():
    # 8 blocks of 16 tokens: two 40-token prompts (3 blocks each) fit, the third waits; at 70
    # tokens each needs 5 blocks, so the younger one is preempted and recomputed later.
    trace = [TraceRequest(0.0, 40, 30)] * 3
    result = run(trace, colocated(batch=8, prefill_tokens=200), blocks=8)
    assert result.completed == 3 and result.max_batch == 2 and result.preemptions >= 1
    assert run(trace, colocated(batch=8, prefill_tokens=200), blocks=1000).preemptions == 0
    # A prompt that no shard can ever hold is rejected, as the engine's check_fits does.
    assert run([TraceRequest(0.0, 200, 5)], colocated(), blocks=8).rejected_kv == 1


# ------------------------------------------------- the engine's own scheduling, replayed

class _OneRank:
    """The process group of a lone colocated driver: nobody to broadcast plans or tokens to."""

    def size(self) -> int:
        return 1


class _RecordingWorker:
    """A model worker that records each plan it is given and makes token 3 the argmax of
    every sampled row: the engine's driver (LLMEngine.step) runs as it does, without a model."""

    def __init__(self, vocab: int):
        from megatron_lamina.worker.token_feed import TokenFeed

        self.vocab, self.plans = vocab, []
        self.feed = TokenFeed(_OneRank(), torch.device("cpu"))

    def run(self, plan):
        self.plans.append(plan)
        logits = torch.zeros(plan.num_sampled, self.vocab)
        logits[:, 3] = 1.0
        return logits


def chunks_of(plan) -> list[list[tuple[int, int, int, int]]]:
    return [[(c.request_id, c.shard, c.start, len(c.tokens)) for c in mb.chunks] for mb in plan.micro_batches]


def engine_replay(trace, layout: Layout, num_blocks: int, max_model_len: int, tokenizer_dir: Path):
    """The real LLMEngine (synchronous scheduling) on `trace`, every request added at once: its
    plans, and per request its output length and finish reason."""
    from megatron_lamina.architecture import ModelArchitecture
    from megatron_lamina.config import load_config
    from megatron_lamina.driver.llm_engine import LLMEngine
    from megatron_lamina.requests.prompt import PromptInput
    from megatron_lamina.worker.runtime import RankContext
    from megatron_lamina.requests.sampling_params import SamplingParams
    from megatron_lamina.topology import ProcessGroups, Topology

    cfg = load_config(None, [f"model.checkpoint={tokenizer_dir}", "scheduler.async_scheduling=false",
                             f"parallel.attention_workers={layout.attention_workers}",
                             f"scheduler.max_batch_size={layout.max_batch_size}",
                             f"scheduler.micro_batches={layout.micro_batches}",
                             f"scheduler.max_prefill_tokens={layout.max_prefill_tokens}",
                             f"kv_cache.block_size={layout.block_size}", f"kv_cache.num_blocks={num_blocks}",
                             "kv_cache.prefix_caching=false"])  # as the simulator, whose prompts are placeholders
    arch = ModelArchitecture(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_attention_heads=4, num_kv_heads=2, head_dim=16,
                             max_position_embeddings=max_model_len, eos_token_ids=[2])
    worker = _RecordingWorker(arch.vocab_size)
    ctx = RankContext(cfg, arch, Topology.from_config(cfg, arch.num_kv_heads),
                      ProcessGroups(None, _OneRank(), _OneRank()), 0, torch.device("cpu"), num_blocks, worker)
    engine = LLMEngine(ctx)
    requests = engine.generate([PromptInput(prompt_token_ids=[7] * r.input_len,
                                            params=SamplingParams(max_tokens=r.output_len, temperature=0.0,
                                                                  ignore_eos=True)) for r in trace])
    assert all(token == 3 for r in requests for token in r.output_token_ids)
    return worker.plans, [(len(r.output_token_ids), r.finish_reason) for r in requests], engine.scheduler


def simulator_replay(trace, layout: Layout, num_blocks: int, max_model_len: int):
    plans = []
    costs = StepCostModel(layout, SHAPE, constant_table(), constant_table())
    sim = EngineSimulator(costs, num_blocks, max_model_len)
    result = sim.run(trace, on_step=lambda plan: plans.append(plan) if plan.micro_batches else None)
    return plans, result


def scaled(path: Path, input_div: int, output_div: int, count: int, max_input: int) -> list[TraceRequest]:
    """The first `count` requests of a committed trace slice, all arriving at once, lengths
    divided to the tiny engine's scale (prompts at most `max_input`)."""
    return [TraceRequest(0.0, min(max_input, max(1, r.input_len // input_div)), max(1, r.output_len // output_div))
            for r in read_trace(path, limit=count)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tiny_models import make_tokenizer

    path = tmp_path_factory.mktemp("codec")
    make_tokenizer().save_pretrained(path / "tokenizer")
    return path


SLICES = ROOT / "configs" / "planner" / "traces"


AZURE = scaled(SLICES / "azure-conv-slice.csv", 40, 6, 24, 40)
MOONCAKE = scaled(SLICES / "mooncake-conv-slice.jsonl", 150, 8, 12, 36)


@pytest.mark.parametrize("trace, layout, num_blocks, max_model_len, ending", [
    # 2 request shards of 12 blocks of 4, 3 micro-batches: preemptions on both shards.
    (AZURE, Layout("X", 1, "X", 2, 1, 3, 6, 16, 4), 12, 256, "preempted"),
    # Long contexts, colocated, one 10-block cache: requests outgrow the whole cache and the
    # scheduler ends them itself (`length` to the client, `kv_capacity` here) ...
    (MOONCAKE, Layout("X", 1, None, 0, 1, 2, 5, 24, 4), 10, 72, "kv_capacity"),
    # ... or a 44-token model context comes first (`length`, `truncated` here).
    (MOONCAKE, Layout("X", 1, None, 0, 1, 2, 5, 24, 4), 12, 44, "truncated"),
], ids=["preempting", "outgrowing-the-cache", "at-the-context"])
def test_the_simulator_schedules_as_the_engine(trace, layout, num_blocks, max_model_len, ending, tokenizer_dir):
    """The simulator drives the engine's Scheduler: its steps (every chunk of every
    micro-batch), its tokens and its endings are the real LLMEngine's on the same requests."""
    engine_plans, engine_requests, scheduler = engine_replay(trace, layout, num_blocks, max_model_len, tokenizer_dir)
    sim_plans, result = simulator_replay(trace, layout, num_blocks, max_model_len)
    assert [chunks_of(p) for p in sim_plans] == [chunks_of(p) for p in engine_plans]
    assert result.steps == len(engine_plans) and result.preemptions == scheduler.num_preemptions
    assert result.output_tokens == sum(n for n, _ in engine_requests)
    assert {reason for _, reason in engine_requests} == {"length"} and result.completed == len(trace)
    # The endings the engine reports as `length` short of max_tokens, told apart here.
    short = [(r, n) for r, (n, _) in zip(trace, engine_requests) if n < r.output_len]
    outgrew = sum(r.input_len + n < max_model_len for r, n in short)
    assert (result.kv_capacity, result.truncated) == (outgrew, len(short) - outgrew)
    counts = {"preempted": result.preemptions, "kv_capacity": result.kv_capacity, "truncated": result.truncated}
    assert counts[ending] > 0


# --------------------------------------------------------------------------- cost tables

def test_cost_table_round_trip(tmp_path):
    specs, link = load_prices()
    table = synthetic_cost_table(PRESETS["llama3-8b"], specs["H100"], link, [1, 2])
    table.save(tmp_path / "t.json")
    loaded = CostTable.load(tmp_path / "t.json")
    assert loaded.to_dict() == table.to_dict() and loaded.synthetic
    for tokens in (1, 3, 100, 5000, 100000):
        assert loaded.model_time(2, tokens) == table.model_time(2, tokens)
    assert loaded.decode_attention_time(37, 37 * 1500) == table.decode_attention_time(37, 37 * 1500)
    with pytest.raises(ValueError, match="no model times for TP=4"):
        loaded.model_time(4, 10)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a cost table"):
        CostTable.load(tmp_path / "bad.json")


def test_interpolation_rules():
    curve = Curve([1.0, 3.0, 5.0], [2.0, 4.0, 10.0])
    assert curve(0.0) == 2.0 and curve(2.0) == 3.0 and curve(4.0) == 7.0
    assert curve(7.0) == 16.0                                       # the last slope continues
    assert Curve([1.0, 2.0], [5.0, 4.0])(10.0) == 4.0                # ... but never downwards
    grid = Grid([1.0, 3.0], [10.0, 30.0], [[1.0, 3.0], [3.0, 9.0]])
    assert grid(2.0, 20.0) == 4.0 and grid(1.0, 30.0) == 3.0
    assert prefill_pairs(1, 10) == 10 and prefill_pairs(4, 4) == 4 + 3 + 2 + 1


def test_kv_capacity_and_config(tmp_path):
    from megatron_lamina.config import load_config

    specs, _ = load_prices()
    shape = PRESETS["llama3-8b"]
    one_h20 = Layout("H100", 1, "H20", 2, 2, 2, 256)
    # An H20 holds 0.9 * 96 GB - 1 GB of KV; with 2 head groups a block is half the heads.
    per_block = 16 * shape.kv_bytes_per_token(2) / 2
    assert kv_blocks_per_cache(one_h20, shape, specs, 2) == int((0.9 * 96e9 - 1e9) // per_block)
    assert kv_blocks_per_cache(Layout("H100", 1, None, 0, 1, 1, 64), PRESETS["llama3-70b"], specs, 2) == 0
    path = tmp_path / "c.yaml"
    path.write_text(config_yaml(one_h20, "checkpoints/llama", "bfloat16", ["a header"]))
    cfg = load_config(path)
    assert (cfg.parallel.tensor_parallel, cfg.parallel.attention_workers, cfg.parallel.attention_head_groups,
            cfg.scheduler.micro_batches, cfg.scheduler.max_batch_size) == (1, 2, 2, 2, 256)
    assert path.read_text().startswith("# a header\n")


@pytest.mark.parametrize("layout, message", [
    (Layout("X", 3, None, 0, 1, 1, 8),
     "parallel.tensor_parallel = 3: must divide the model's 2 KV heads; allowed values are 1, 2"),
    (Layout("X", 1, "X", 4, 4, 2, 8),
     "parallel.attention_head_groups = 4: must divide the model's 2 KV heads; allowed values are 1, 2"),
    (Layout("X", 1, None, 0, 2, 1, 8), "parallel.attention_head_groups = 2: must be 1 when "
     "parallel.attention_workers = 0 (colocated: there are no attention workers to group)"),
    (Layout("X", 1, "X", 3, 2, 2, 8), "parallel.attention_workers = 3: must be a multiple of "
     "parallel.attention_head_groups (2), one worker per head group and request shard; allowed values are 2, 4, 6, ..."),
    (Layout("X", 1, "X", 2, 1, 4, 3), "scheduler.micro_batches = 4: must be <= scheduler.max_batch_size (3), "
     "every micro-batch needs at least one request"),
])
def test_the_planner_refuses_what_the_engine_refuses(layout, message):
    """Layout.check and config.validate_layout are one rule: a layout the planner refuses, the
    engine refuses its config with the same message, naming the key and the allowed values."""
    from megatron_lamina.config import ConfigError, load_config, validate_layout

    with pytest.raises(ConfigError) as planner:
        layout.check(SHAPE)
    keys = {"model.checkpoint": "unused"}
    for section, values in (("parallel", layout.parallel_section()), ("scheduler", layout.scheduler_section())):
        keys.update({f"{section}.{name}": value for name, value in values.items()})
    cfg = load_config(None, values=keys)
    with pytest.raises(ConfigError) as engine:
        validate_layout(cfg, cfg.world_size, SHAPE.to_architecture())
    assert str(planner.value) == str(engine.value) == f"config: {message}"


# -------------------------------------------------------------------------------- search

def test_search_ranks_a_dominated_layout_below_a_better_one():
    """CHEAP is FAST at a third of the price: 1 FAST model worker + 1 CHEAP attention worker
    must rank above the same layout with a FAST attention worker (same throughput, dearer),
    and a layout that misses the SLO below every one that meets it."""
    fast = DeviceSpec("FAST", 9.0, 989, 80, 3.35, 450)
    cheap = DeviceSpec("CHEAP", 3.0, 989, 80, 3.35, 450)
    specs = {"FAST": fast, "CHEAP": cheap}
    shape, link = PRESETS["llama3-8b"], Link("test", 400, 10)
    tables = {name: synthetic_cost_table(shape, spec, link, [1]) for name, spec in specs.items()}
    trace = [TraceRequest(0.0, 500 + 37 * i % 700, 50 + 13 * i % 100) for i in range(64)]
    space = SearchSpace(model_devices=("FAST",), attention_devices=("FAST", "CHEAP"), tp_sizes=(1,),
                        attention_workers=(1,), micro_batches=(2,), batch_caps=(32, 64))
    ranked = search(trace, shape, tables, specs, Slo(tpot_s=1.0), space)
    labels = [c.layout.label for c in ranked]
    better = labels.index("1xFAST + 1xCHEAP TP1 g1 n2 b64")
    dominated = labels.index("1xFAST + 1xFAST TP1 g1 n2 b64")
    assert better < dominated
    assert ranked[better].result.output_throughput == ranked[dominated].result.output_throughput
    assert ranked[better].tokens_per_dollar == pytest.approx(1.5 * ranked[dominated].tokens_per_dollar)  # $12 vs $18/h
    # A tight SLO that only small batches meet: every infeasible candidate ranks last.
    tight = search(trace, shape, tables, specs, Slo(tpot_s=ranked[-1].result.tpot_s["p90"] * 0.999), space)
    flags = [c.feasible for c in tight]
    assert flags == sorted(flags, reverse=True) and not all(flags)


def shared_prefix_trace(documents: int, requests: int = 128) -> list[TraceRequest]:
    """A Mooncake-like slice: each 2,560-token prompt is one of `documents` shared
    2,048-token documents (4 hash ids), taken round robin, then a 512-token block of its own."""
    return [TraceRequest(0.0, 2560, 16, tuple(range(4 * (i % documents), 4 * (i % documents) + 4)) + (10_000 + i,))
            for i in range(requests)]


def test_search_prices_each_layouts_prefix_cache():
    """Issue 25's planner: with the prefix cache every layout's hits come from the trace's
    hash_ids and its own KV pool. SMALL holds 1,239 blocks of llama3-8b, so one attention
    worker, beside its 4 running requests, keeps fewer blocks than the 12 documents take: round
    robin evicts each before it returns, and nothing hits. Two (two head groups: one pool of
    twice the blocks) keep them all. Without the cache the second worker does not pay for
    itself; with it, it does, and the cache beats no cache. A host tier gives one worker back
    the hits its device pool cannot keep."""
    from megatron_lamina.planner.search import PrefixCache

    fast = DeviceSpec("FAST", 9.0, 989, 80, 3.35, 450)
    small = DeviceSpec("SMALL", 1.0, 989, 4, 3.35, 450)
    specs = {"FAST": fast, "SMALL": small}
    shape = PRESETS["llama3-8b"]
    tables = {name: synthetic_cost_table(shape, spec, Link("test", 400, 10), [1]) for name, spec in specs.items()}
    space = SearchSpace(model_devices=("FAST",), attention_devices=("SMALL",), tp_sizes=(1,),
                        attention_workers=(1, 2), micro_batches=(2,), batch_caps=(4,))
    trace = shared_prefix_trace(12)

    def ranked(prefix):
        return {c.layout.label: c for c in search(trace, shape, tables, specs, Slo(tpot_s=1.0), space, prefix=prefix)}

    off, on, host = ranked(None), ranked(PrefixCache()), ranked(PrefixCache(host_cache_gib=4))
    one, two = "1xFAST + 1xSMALL TP1 g1 n2 b4", "1xFAST + 2xSMALL TP1 g2 n2 b4"
    assert on[two].result.num_blocks // 2 == on[one].result.num_blocks == 1239  # half the heads a block
    assert off[one].result.prefix_hit_rate is None
    assert off[two].tokens_per_dollar < off[one].tokens_per_dollar
    assert on[one].result.prefix_hit_rate < 0.1 < 0.6 < on[two].result.prefix_hit_rate
    assert on[two].tokens_per_dollar > on[one].tokens_per_dollar
    assert on[two].tokens_per_dollar > off[two].tokens_per_dollar
    assert max(c.tokens_per_dollar for c in on.values()) > max(c.tokens_per_dollar for c in off.values())
    assert host[one].result.prefix_hit_rate > 0.6 and host[one].tokens_per_dollar > on[one].tokens_per_dollar


# -------------------------------------------------------------------------------- traces

def test_trace_formats_and_selection(tmp_path):
    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:15:51.1805900,879,5\n")
    mooncake = tmp_path / "m.jsonl"
    mooncake.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]}\n'
                        '{"timestamp": 2500, "input_length": 20, "output_length": 7, "hash_ids": [2]}\n')
    a = read_trace(azure)
    assert [(round(r.arrival_s, 6), r.input_len, r.output_len) for r in a] == \
        [(0.0, 374, 44), (4.314579, 396, 109), (4.5, 879, 5)]
    assert read_trace(mooncake) == [TraceRequest(0.0, 10, 5, (1,)), TraceRequest(2.5, 20, 7, (2,))]
    assert read_trace(azure, skip=1, limit=1)[0] == TraceRequest(0.0, 396, 109)
    chosen, clipped = select(a, rate_scale=2.0, max_input_len=400, max_output_len=50, duration_s=2.2)
    assert [(r.arrival_s, r.input_len, r.output_len) for r in chosen] == [(0.0, 374, 44), (a[1].arrival_s / 2, 396, 50)]
    assert (clipped.input_clipped, clipped.output_clipped) == (0, 1)
    poisson, _ = select(a * 100, poisson_rate=10.0, seed=3)
    gaps = [b.arrival_s - a_.arrival_s for a_, b in zip(poisson, poisson[1:])]
    assert 0.07 < sum(gaps) / len(gaps) < 0.13
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the trace format"):
        read_trace(tmp_path / "t.txt")
    with pytest.raises(ValueError, match="no such trace file"):
        read_trace(tmp_path / "missing.csv")


@pytest.mark.skipif(not TRACES.is_dir(), reason=f"no request traces at {TRACES} (CI copies shared/ beside the clone)")
def test_the_shared_traces_read():
    for name, first in [("AzureLLMInferenceTrace_conv.csv", (374, 44)), ("AzureLLMInferenceTrace_code.csv", (4808, 10)),
                        ("mooncake_conversation_trace.jsonl", (6758, 500))]:
        trace = read_trace(TRACES / name, limit=50)
        assert len(trace) == 50 and trace[0].arrival_s == 0.0
        assert (trace[0].input_len, trace[0].output_len) == first
        assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace, trace[1:]))


@pytest.mark.skipif(not (TRACES / "mooncake_conversation_trace.jsonl").is_file(), reason="no request traces")
def test_the_simulator_with_the_prefix_cache():
    """Prompts built from a Mooncake slice's hash_ids share exactly its blocks; with the
    engine's prefix cache the simulator serves at least 0.95 of the offline LRU bound of the
    same requests (issue 25's target), and the prefill it skips shortens the first tokens;
    without it there is no hit rate to report."""
    from megatron_lamina.bench.prefix_trace import lru_hit_bound
    from megatron_lamina.planner.simulator import prefix_prompt

    a, b = prefix_prompt((3, 4, 5), 1100, 0), prefix_prompt((3, 4, 6), 1100, 1)
    assert a[:1024] == b[:1024] and a[1024:] != b[1024:] and prefix_prompt((3,), 600, 2)[512:] == [-3] * 88
    trace, _ = select(read_trace(TRACES / "mooncake_conversation_trace.jsonl", limit=60), max_input_len=3000,
                      max_output_len=8)
    bound = lru_hit_bound([(list(r.hash_ids), r.input_len) for r in trace], None)["hit_rate"]
    layout, table = Layout("X", 1, "X", 1, 1, 2, 16, 512, 16), constant_table()
    off = simulate(trace, layout, SHAPE, table, table, 400)
    on = simulate(trace, layout, SHAPE, table, table, 400, prefix_caching=True)
    assert off.prefix_hit_rate is None and bound > 0.1
    assert on.prefix_hit_rate >= 0.95 * bound and on.ttft_s["p50"] < off.ttft_s["p50"]
    assert on.completed == off.completed == len(trace)
    with pytest.raises(ValueError, match="decode_only"):
        simulate(trace, layout, SHAPE, table, table, 400, decode_only=True, prefix_caching=True)


def test_a_saturated_replay_shares_only_what_the_trace_shares():
    """Saturation cycles the trace to fill the batch; each pass is new traffic with the
    trace's own sharing, so four prompts that share nothing never hit, however often they are
    replayed, and four that share a 1,024-token head hit it in every pass but the first."""
    from megatron_lamina.planner.simulator import simulate

    layout, table = Layout("X", 1, "X", 1, 1, 2, 16, 512, 16), constant_table()
    apart = [TraceRequest(0.0, 1100, 4, (2 * i, 2 * i + 1)) for i in range(4)]
    shared = [TraceRequest(0.0, 1100, 4, (0, 1, 10 + i)) for i in range(4)]
    assert simulate(apart, layout, SHAPE, table, table, 4000, saturate=True, prefix_caching=True).prefix_hit_rate == 0
    assert simulate(shared, layout, SHAPE, table, table, 4000, saturate=True, prefix_caching=True).prefix_hit_rate > 0.5
