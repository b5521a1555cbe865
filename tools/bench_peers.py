"""Benchmark (c) against peers: whole-model decode throughput of our colocated engine step,
Megatron-core's static inference engine and `transformers` `generate` (static cache), all
built from the SAME random weights on the same GPU in one run, against the roofline.

    python tools/bench_peers.py --batches 64,128,256 --contexts 1024,4096 --out peers.json
    python tools/bench_peers.py --device cpu --shape tiny --batches 2 --contexts 16   # smoke run

Every system decodes `batch` requests that already hold `context` tokens, one token each:
  * ours: `bench/decode_step.colocated_decode_ms` (paged cache with random K/V, Triton kernel,
    CUDA graphs and eager; the faster is reported), model step only;
  * Megatron-core: `GPTModel` from `get_gpt_layer_local_spec()` (Transformer-Engine and
    flash-attn are not on the device image, so the dynamic engine cannot run; its static
    path is measured) behind `GPTInferenceWrapper` and a `StaticInferenceContext` whose
    KV cache is filled with random values at `context` tokens; the timed step is
    `run_one_forward_step` in decode mode, the call `TextGenerationController` makes each
    step of `StaticInferenceEngine`, model step only; eager and `cuda_graph_impl="local"`;
  * transformers: `generate(do_sample=False, cache_implementation="static")` on prompts of
    `context` random tokens (chunked prefill where the version has it); a logits processor
    records a CUDA event per generated token, so the step time is the median gap between
    decode steps of generate's own loop (forward, logits processing, argmax, bookkeeping).
A greedy check first runs the three on a short prompt (StaticInferenceEngine.generate for
Megatron) and records how many tokens agree. Shapes whose weights + KV exceed 85 % of the
GPU's memory are skipped for every system; one failing system records its error and the
others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without pip install

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_lamina.architecture import ModelArchitecture  # noqa: E402
from megatron_lamina.attention.kv_cache import PagedKVCache  # noqa: E402
from megatron_lamina.bench.decode_step import (  # noqa: E402
    check_context,
    colocated_decode_ms,
    kv_bytes,
    local_worker,
    roofline_s,
)
from megatron_lamina.bench.ranks import init_one_rank  # noqa: E402
from megatron_lamina.bench.timing import ceilings, time_ms, wall_s  # noqa: E402
from megatron_lamina.checkpoint.layout import canonical_tensor_shapes, split_qkv  # noqa: E402
from megatron_lamina.engine.worker_factory import attention_backend  # noqa: E402
from megatron_lamina.model.llama import LlamaModel  # noqa: E402
from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan  # noqa: E402
from megatron_lamina.planner.shapes import PRESETS  # noqa: E402


def free_gpu() -> None:
    gc.collect()  # Megatron's and transformers' objects hold reference cycles
    torch.cuda.empty_cache()


def step_ms(fn, device: str, repeat: int = 10) -> float:
    """Median ms of `fn()`: CUDA events on a GPU, the host clock on the CPU (one warm-up)."""
    if device == "cuda":
        return time_ms(fn, repeat=repeat)
    return wall_s(lambda _: fn(), torch.device(device), 1, repeat) * 1e3


def random_weights(arch: ModelArchitecture, dtype: torch.dtype, std: float, seed: int, device: str) -> dict:
    """Canonical tensors (Megatron naming, see architecture.py) kept on the CPU: norms 1,
    matrices N(0, std), drawn on `device`."""
    generator = torch.Generator(device).manual_seed(seed)
    weights = {}
    for name, shape in canonical_tensor_shapes(arch).items():
        t = torch.ones(shape, dtype=dtype, device=device) if len(shape) == 1 else \
            torch.empty(shape, dtype=dtype, device=device).normal_(0, std, generator=generator)
        weights[name] = t.cpu()
    return weights


def load_canonical(module: torch.nn.Module, weights: dict) -> None:
    missing, unexpected = module.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") or "inv_freq" in k for k in missing), missing


# -- ours ---------------------------------------------------------------------------------------

def build_ours(arch, weights, dtype, device):
    model = LlamaModel(arch, dtype, dist.new_group([0]), arch.vocab_size, fused_elementwise=device == "cuda")
    model = model.to(device)
    load_canonical(model, weights)
    return model


def ours_greedy(model, arch, prompts: torch.Tensor, steps: int, device: str) -> torch.Tensor:
    """Greedy tokens [batch, steps] through our model worker: one prefill step, then decode steps."""
    batch, length = prompts.shape
    block = 16
    per_request = math.ceil((length + steps) / block)
    cache = PagedKVCache(arch.num_layers, batch * per_request, block, arch.num_kv_heads, arch.head_dim,
                         model.config.params_dtype, device)
    step_worker = local_worker(model, attention_backend(cache, torch.device(device)))
    tables = [list(range(i * per_request, (i + 1) * per_request)) for i in range(batch)]
    chunks = [SequenceChunk(i, 0, 0, prompts[i].tolist(), [], True, block_table=tables[i]) for i in range(batch)]
    out = []
    for step in range(steps):
        tokens = step_worker.run(StepPlan([MicroBatch(chunks)])).argmax(-1).cpu()
        out.append(tokens)
        chunks = [SequenceChunk(i, 0, length + step, [int(tokens[i])], [], True, block_table=tables[i])
                  for i in range(batch)]
    return torch.stack(out, 1)


def measure_ours(arch, weights, cases, args) -> dict:
    model = build_ours(arch, weights, torch.bfloat16, "cuda")
    result = {"greedy": ours_greedy(model, arch, args.check_prompts, args.check_tokens, "cuda").tolist()}
    for batch, context in cases:
        times = colocated_decode_ms(model, arch, batch, context, args.block_size, [False, True])
        result[f"{batch}x{context}"] = {"eager_ms": times[False], "graphs_ms": times[True], "ms": min(times.values())}
    return result


# -- Megatron-core ------------------------------------------------------------------------------

class TokenIds:
    """The tokenizer the static engine asks for: prompts are space-separated token ids."""

    eod = -1  # never generated: the engine runs every request to num_tokens_to_generate
    bos = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, tokens) -> str:
        return " ".join(str(int(t)) for t in tokens)


@contextlib.contextmanager
def megatron_on_cpu():
    """Megatron's inference path asks torch.cuda for its device and forks the CUDA RNG
    tracker (for a dropout of 0); on a CPU-only torch (the tiny smoke run and the test)
    both are shimmed. The GPU run uses neither shim."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = torch.cuda.current_device, tracker.fork
    torch.cuda.current_device = lambda: "cpu"
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.current_device, tracker.fork = saved


def init_megatron_parallel(device: str) -> None:
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if device == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(1234)


def build_megatron(arch, weights, dtype, device, cuda_graphs: bool = False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, attention_backend=AttnBackend.local,
        use_cpu_initialization=device == "cpu", perform_initialization=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, **({"cuda_graph_impl": "local"} if cuda_graphs else {}),
    )
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=arch.vocab_size,
                     max_sequence_length=arch.max_position_embeddings, position_embedding_type="rope",
                     rotary_base=int(arch.rope_theta), share_embeddings_and_output_weights=arch.tie_word_embeddings)
    # What Megatron's Float16Module does for inference: every parameter in the model dtype
    # (without apex, the torch RMSNorm weights are created in float32).
    for p in model.parameters():
        p.data = p.data.to(device=device, dtype=dtype)
    load_canonical(model, weights)
    return model.eval()


def megatron_wrapper(model, arch, dtype, batch: int, max_length: int):
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper,
    )
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
        InferenceWrapperConfig,
    )

    config = InferenceWrapperConfig(hidden_size=arch.hidden_size, inference_batch_times_seqlen_threshold=-1,
                                    fp32_residual_connection=False, params_dtype=dtype,
                                    padded_vocab_size=arch.vocab_size, inference_max_requests=batch,
                                    inference_max_seq_length=max_length)
    return GPTInferenceWrapper(model, config, StaticInferenceContext(batch, max_length))


def megatron_greedy(model, arch, dtype, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens [batch, steps] from Megatron's StaticInferenceEngine (legacy static path)."""
    from megatron.core.inference.engines.static_engine import StaticInferenceEngine
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    wrapper = megatron_wrapper(model, arch, dtype, prompts.shape[0], prompts.shape[1] + steps)
    controller = TextGenerationController(wrapper, TokenIds(arch.vocab_size))
    engine = StaticInferenceEngine(controller, max_batch_size=prompts.shape[0], legacy=True)
    texts = [" ".join(map(str, p.tolist())) for p in prompts]
    results = engine.generate(prompts=texts, sampling_params=SamplingParams(top_k=1, num_tokens_to_generate=steps))
    return torch.stack([torch.as_tensor(r.generated_tokens).cpu() for r in results])


def megatron_wrapper_greedy(model, arch, dtype, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """The same greedy tokens through the wrapper calls the engine makes (one prefill forward,
    then decode-mode forwards): the CPU path (the engine itself calls .cuda()), and on the
    GPU the check that the timed step is the engine's step."""
    batch, length = prompts.shape
    wrapper = megatron_wrapper(model, arch, dtype, batch, length + steps)
    wrapper.prep_model_for_inference()
    device = next(model.parameters()).device
    tokens = torch.cat([prompts.to(device), torch.zeros(batch, steps, dtype=torch.long, device=device)], 1)
    inputs = wrapper.prep_inference_input(tokens)
    start = 0
    for end in range(length, length + steps):
        window = wrapper.get_batch_for_context_window(inputs, start, end)
        if end > length:  # decode steps run without a mask, as the controller runs them with CUDA graphs
            window["attention_mask"] = None
        logits = wrapper.run_one_forward_step(window)
        tokens[:, end] = logits[:, -1].argmax(-1)
        wrapper.inference_context.enable_decode_mode()
        start = end
    return tokens[:, length:].cpu()


def megatron_decode_ms(wrapper, batch: int, context: int, device: str) -> float:
    """One decode step of the static engine with `context` tokens cached (random K/V)."""
    ctx = wrapper.inference_context
    wrapper.prep_model_for_inference()
    tokens = torch.randint(0, wrapper.inference_wrapper_config.padded_vocab_size, (batch, 1), device=device)
    # A one-token forward at position 0 allocates the cache ([max_length, batch, kv_heads, d] per layer).
    wrapper.run_one_forward_step({"tokens": tokens, "position_ids": torch.zeros_like(tokens), "attention_mask": None})
    with torch.inference_mode():  # the cache was made in inference mode
        for k, v in ctx.key_value_memory_dict.values():
            k.normal_()
            v.normal_()
    ctx.enable_decode_mode()
    inputs = {"tokens": tokens, "position_ids": torch.full_like(tokens, context), "attention_mask": None}

    def step():
        ctx.sequence_len_offset = context  # every repetition decodes position `context` again
        return wrapper.run_one_forward_step(inputs)

    return step_ms(step, device)


def measure_megatron(arch, weights, cases, args) -> dict:
    init_megatron_parallel("cuda")
    result = {}
    for graphs in (False, True):
        mode = "graphs" if graphs else "eager"
        try:
            model = build_megatron(arch, weights, torch.bfloat16, "cuda", cuda_graphs=graphs)
            if not graphs:
                result["greedy"] = megatron_greedy(model, arch, torch.bfloat16, args.check_prompts,
                                                   args.check_tokens).tolist()
            result[f"greedy_wrapper_{mode}"] = megatron_wrapper_greedy(
                model, arch, torch.bfloat16, args.check_prompts, args.check_tokens).tolist()
            for batch, context in cases:
                wrapper = megatron_wrapper(model, arch, torch.bfloat16, batch, context + 2)
                try:
                    ms = megatron_decode_ms(wrapper, batch, context, "cuda")
                    result.setdefault(f"{batch}x{context}", {})[f"{mode}_ms"] = ms
                except Exception as error:  # noqa: BLE001 - recorded, the other shapes still run
                    result.setdefault(f"{batch}x{context}", {})[f"{mode}_error"] = repr(error)
                wrapper.inference_context.key_value_memory_dict.clear()
                del wrapper
                free_gpu()
        except Exception as error:  # noqa: BLE001
            result[f"{mode}_error"] = traceback.format_exc(limit=4) or repr(error)
        model = None
        free_gpu()
    # Graph replays count only if they decode what the eager wrapper steps decode.
    result["graphs_valid"] = result.get("greedy_wrapper_graphs") == result.get("greedy_wrapper_eager") is not None
    for case in cases:
        times = [v for k, v in result.get(f"{case[0]}x{case[1]}", {}).items()
                 if k == "eager_ms" or (k == "graphs_ms" and result["graphs_valid"])]
        if times:
            result[f"{case[0]}x{case[1]}"]["ms"] = min(times)
    return result


# -- transformers -------------------------------------------------------------------------------

def hf_weights(arch, weights, device) -> dict:
    """Canonical tensors -> LlamaForCausalLM state dict (split QKV and gate/up)."""
    out = {"model.embed_tokens.weight": weights["embedding.word_embeddings.weight"],
           "model.norm.weight": weights["decoder.final_layernorm.weight"]}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = weights["output_layer.weight"]
    for i in range(arch.num_layers):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        q, k, v = split_qkv(weights[f"{src}.self_attention.linear_qkv.weight"], arch)
        gate, up = weights[f"{src}.mlp.linear_fc1.weight"].chunk(2)
        out.update({f"{dst}.input_layernorm.weight": weights[f"{src}.input_layernorm.weight"],
                    f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.k_proj.weight": k,
                    f"{dst}.self_attn.v_proj.weight": v,
                    f"{dst}.self_attn.o_proj.weight": weights[f"{src}.self_attention.linear_proj.weight"],
                    f"{dst}.post_attention_layernorm.weight": weights[f"{src}.pre_mlp_layernorm.weight"],
                    f"{dst}.mlp.gate_proj.weight": gate, f"{dst}.mlp.up_proj.weight": up,
                    f"{dst}.mlp.down_proj.weight": weights[f"{src}.mlp.linear_fc2.weight"]})
    return {name: t.to(device).contiguous() for name, t in out.items()}


def build_hf(arch, weights, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                         intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
                         num_attention_heads=arch.num_attention_heads, num_key_value_heads=arch.num_kv_heads,
                         head_dim=arch.head_dim, max_position_embeddings=arch.max_position_embeddings,
                         rms_norm_eps=arch.rms_norm_eps, rope_theta=arch.rope_theta,
                         tie_word_embeddings=arch.tie_word_embeddings, attention_bias=arch.qkv_bias,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # `dtype=` (5.x) vs `torch_dtype=` (4.x) avoided: same effect
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    missing, unexpected = model.load_state_dict(hf_weights(arch, weights, device), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.eval()


class StepEvents:
    """A logits processor that only records when each generated token's logits exist."""

    def __init__(self, device: str):
        self.device, self.marks = device, []

    def __call__(self, input_ids, scores):
        if self.device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return scores

    def gaps_ms(self) -> list[float]:
        if self.device == "cuda":
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def hf_generate(model, prompts: torch.Tensor, steps: int, device: str, events=None) -> torch.Tensor:
    from transformers import GenerationConfig, LogitsProcessorList

    extra = {}
    if hasattr(GenerationConfig(), "prefill_chunk_size"):  # bounds prefill activations at batch x 4K
        extra["prefill_chunk_size"] = max(16, 32768 // prompts.shape[0])
    with torch.no_grad():
        out = model.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             cache_implementation="static", pad_token_id=0,
                             logits_processor=LogitsProcessorList([events] if events else []), **extra)
    return out[:, prompts.shape[1]:].cpu()


def hf_decode_ms(model, arch, batch: int, context: int, steps: int, device: str) -> float:
    events = StepEvents(device)
    prompts = torch.randint(3, arch.vocab_size, (batch, context))
    hf_generate(model, prompts, steps, device, events)
    gaps = events.gaps_ms()[2:]  # the first gaps follow the prefill: warm-up
    return statistics.median(gaps)


def measure_hf(arch, weights, cases, args) -> dict:
    model = build_hf(arch, weights, torch.bfloat16, "cuda")
    result = {"greedy": hf_generate(model, args.check_prompts, args.check_tokens, "cuda").tolist()}
    for batch, context in cases:
        try:
            result[f"{batch}x{context}"] = {"ms": hf_decode_ms(model, arch, batch, context, args.steps, "cuda")}
        except Exception as error:  # noqa: BLE001
            result[f"{batch}x{context}"] = {"error": repr(error)}
        free_gpu()
    del model
    free_gpu()
    return result


# -- driver -------------------------------------------------------------------------------------

def agreement(tokens: dict) -> dict:
    """Per system, the fraction of (request, step) greedy tokens equal to transformers'."""
    reference = tokens.get("hf")
    if reference is None:
        return {}
    ref = torch.tensor(reference)
    return {name: float((torch.tensor(t) == ref).float().mean()) for name, t in tokens.items()
            if name != "hf" and t is not None and torch.tensor(t).shape == ref.shape}


def run_gpu(args) -> dict:
    init_one_rank("nccl")
    arch = PRESETS[args.shape].to_architecture()
    copy_bw, gemm_rate = ceilings()
    weights = random_weights(arch, torch.bfloat16, 0.02, 0, "cuda")
    params = sum(t.numel() for t in weights.values())
    memory = torch.cuda.get_device_properties(0).total_memory
    cases, skipped = [], []
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            need = kv_bytes(arch, batch, context + args.steps) + params * 2
            (cases if need <= 0.85 * memory else skipped).append((batch, context, need))
    cases = [(b, c) for b, c, _ in cases]
    args.check_prompts = torch.randint(3, arch.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    result = {"device": torch.cuda.get_device_name(), "shape": args.shape, "copy_TBps": copy_bw / 1e12,
              "gemm_TFLOPs": gemm_rate / 1e12, "parameters": params, "decode_steps_hf": args.steps,
              "skipped": [{"batch": b, "context": c, "reason": f"weights + KV {n / 1e9:.0f} GB > 85 % of "
                           f"{memory / 1e9:.0f} GB"} for b, c, n in skipped], "systems": {}}
    for name, measure in (("ours", measure_ours), ("megatron", measure_megatron), ("hf", measure_hf)):
        print(f"[bench_peers] {name} ...", flush=True)
        start = time.time()
        try:
            result["systems"][name] = measure(arch, weights, cases, args)
        except Exception:  # noqa: BLE001 - one failing peer must not stop the others
            result["systems"][name] = {"error": traceback.format_exc(limit=6)}
            print(result["systems"][name]["error"], flush=True)
        free_gpu()
        print(f"[bench_peers] {name} done in {time.time() - start:.0f} s", flush=True)
    result["greedy_agreement_with_hf"] = agreement({n: s.get("greedy") for n, s in result["systems"].items()})
    mcore = result["systems"]["megatron"]
    result["megatron_engine_equals_timed_steps"] = mcore.get("greedy") == mcore.get("greedy_wrapper_eager") is not None
    result["rows"] = []
    for batch, context in cases:
        row = {"batch": batch, "context": context,
               "roofline_tokens_per_s": batch / roofline_s(arch, params, batch, context, copy_bw, gemm_rate)}
        for name, system in result["systems"].items():
            ms = system.get(f"{batch}x{context}", {}).get("ms")
            row[f"{name}_tokens_per_s"] = batch / (ms / 1e3) if ms else None
        result["rows"].append(row)
    dist.destroy_process_group()
    return result


def print_table(result: dict) -> None:
    def fmt(x, spec=".0f"):
        return "-" if x is None else format(x, spec)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    print(f"{result['device']}: copy {result['copy_TBps']:.2f} TB/s, bf16 GEMM {result['gemm_TFLOPs']:.0f} TFLOP/s, "
          f"{result['parameters'] / 1e9:.2f} B parameters; greedy agreement with HF: {result['greedy_agreement_with_hf']}; "
          f"Megatron engine tokens = its timed wrapper steps' tokens: {result['megatron_engine_equals_timed_steps']}; "
          f"Megatron CUDA graphs valid: {result['systems']['megatron'].get('graphs_valid')}")
    for name, system in result["systems"].items():
        for key, value in system.items():
            if "error" in key:
                print(f"{name} {key}: {str(value).strip().splitlines()[-1]}")
    print(f"{'batch':>6} {'ctx':>6} {'ours':>8} {'megatron':>9} {'HF':>8} {'roofline':>9} "
          f"{'ours/mcore':>10} {'ours/HF':>8} {'% roofline':>10}   (tokens/s)")
    for r in result["rows"]:
        ours, mcore, hf, roof = (r.get(f"{n}_tokens_per_s") for n in ("ours", "megatron", "hf", "roofline"))
        frac = ratio(ours, roof)
        print(f"{r['batch']:>6} {r['context']:>6} {fmt(ours):>8} {fmt(mcore):>9} {fmt(hf):>8} {fmt(roof):>9} "
              f"{fmt(ratio(ours, mcore), '.2f'):>10} {fmt(ratio(ours, hf), '.2f'):>8} "
              f"{fmt(None if frac is None else 100 * frac, '.1f'):>10}")
    for s in result["skipped"]:
        print(f"{s['batch']:>6} {s['context']:>6}  skipped: {s['reason']}")


def run_cpu(args) -> dict:
    """The tiny smoke run: greedy agreement of the three systems on one set of float32
    weights, and each system's decode step timed on the CPU (not a performance figure)."""
    if not dist.is_initialized():
        init_one_rank("gloo")
    arch = PRESETS[args.shape].to_architecture()
    weights = random_weights(arch, torch.float32, 0.1, 0, "cpu")
    prompts = torch.randint(3, arch.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    steps, batch, context = 5, int(args.batches.split(",")[0]), int(args.contexts.split(",")[0])
    model = build_ours(arch, weights, torch.float32, "cpu")
    tokens = {"ours": ours_greedy(model, arch, prompts, steps, "cpu").tolist()}
    hf = build_hf(arch, weights, torch.float32, "cpu")
    tokens["hf"] = hf_generate(hf, prompts, steps, "cpu").tolist()
    times = {"hf": hf_decode_ms(hf, arch, batch, context, 6, "cpu")}
    with megatron_on_cpu():
        init_megatron_parallel("cpu")
        mcore = build_megatron(arch, weights, torch.float32, "cpu")
        tokens["megatron"] = megatron_wrapper_greedy(mcore, arch, torch.float32, prompts, steps).tolist()
        times["megatron"] = megatron_decode_ms(megatron_wrapper(mcore, arch, torch.float32, batch, context + 2),
                                               batch, context, "cpu")
    return {"device": "cpu", "shape": args.shape, "greedy": tokens, "greedy_agreement_with_hf": agreement(tokens),
            "decode_ms": times}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=PRESETS,
                        help="model shape preset (megatron_lamina/planner/shapes.py)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--steps", type=int, default=24, help="tokens generate() decodes per shape")
    parser.add_argument("--check-tokens", type=int, default=8, help="greedy tokens of the agreement check")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--out", default="bench_peers.json")
    args = parser.parse_args(argv)
    try:
        check_context(PRESETS[args.shape].to_architecture(),
                      [int(c) + args.steps for c in args.contexts.split(",")], args.shape)
    except ValueError as e:
        parser.error(f"--contexts (+ --steps): {e}")
    result = run_gpu(args) if args.device == "cuda" else run_cpu(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.device == "cuda":
        print_table(result)
    else:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
