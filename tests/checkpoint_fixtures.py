"""Builders of tiny source checkpoints for the checkpoint tests (nothing is downloaded).

`tiny_tokenizer()` trains a byte-level BPE in memory and wraps it with a chat template;
`save_tiny_hf_model(...)` writes a random transformers LLaMA/Qwen2 model plus that tokenizer
the way `save_pretrained` does (or as an old-style pytorch_model.bin); `write_tiny_gguf(...)`
writes a llama GGUF from a HF state dict the way llama.cpp's converter does (Q/K rows
permuted for its RoPE, chosen tensors F16 or quantized). Imported by tests/test_checkpoint_*.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS, EOS = 2, 3  # ids of <|im_start|>, <|im_end|>


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=288, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["hello world", "the quick brown fox jumps over the lazy dog", "hello there, general"] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def hf_config(model_type: str = "llama", *, tie: bool = False, vocab_size: int = 320, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    kwargs.update(overrides)
    return (Qwen2Config if model_type == "qwen2" else LlamaConfig)(**kwargs)


def random_hf_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases too, so a mix-up cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    return model.eval()


def save_tiny_hf_model(model, tokenizer, path: Path, weights: str = "safetensors", max_shard_size=None) -> Path:
    """weights: "safetensors" (save_pretrained) or "bin" (an old-style pytorch_model.bin)."""
    path.mkdir(parents=True, exist_ok=True)
    if weights == "bin":
        model.config.save_pretrained(path)
        model.generation_config.save_pretrained(path)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, path / "pytorch_model.bin")
    else:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


# -- GGUF -------------------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to LLaMA's q_proj/k_proj rows (for its
    interleaved-pair RoPE): row j of each head's half h moves to 2j + h."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tokenizer_metadata(tokenizer) -> dict:
    """tokens / token types / merges of a byte-level BPE, as llama.cpp stores a "gpt2" tokenizer."""
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == len(vocab)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]  # CONTROL / NORMAL
    return {"tokens": tokens, "types": types, "merges": merges}


def write_tiny_gguf(path: Path, model, tokenizer, types: dict[str, str], architecture: str = "llama") -> Path:
    """Write `model` (a tiny LlamaForCausalLM, or a Qwen2 one with architecture="qwen2") as
    llama.cpp would. `types` maps GGUF tensor names or their last parts ("attn_k.weight" for
    every blk.N.attn_k.weight) to "F16", "Q8_0" or "I32"; the others are F32."""
    import gguf

    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    meta = gguf_tokenizer_metadata(tokenizer)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_chat_template(CHAT_TEMPLATE)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    hf_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    if getattr(c, "model_type", "") == "qwen2":
        hf_layer.update({f"self_attn.{x}_proj.bias": f"attn_{x}.bias" for x in "qkv"})
    for i in range(c.num_hidden_layers):
        for hf, gg in hf_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    for hf_name, gguf_name in names.items():
        data = sd[hf_name]
        if architecture == "llama" and ".attn_q." in gguf_name:  # llama.cpp permutes llama only
            data = llama_cpp_permute(data, c.num_attention_heads)
        elif architecture == "llama" and ".attn_k." in gguf_name:
            data = llama_cpp_permute(data, c.num_key_value_heads)
        kind = next((t for s, t in types.items() if gguf_name == s or gguf_name.endswith("." + s)), "F32")
        if kind == "F16":
            w.add_tensor(gguf_name, data.astype(np.float16))
        elif kind == "I32":
            w.add_tensor(gguf_name, data.astype(np.int32))
        elif kind == "F32":
            w.add_tensor(gguf_name, data.astype(np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_roundtrip(data: np.ndarray, kind: str) -> np.ndarray:
    """The values a GGUF tensor of type `kind` holds for `data` (what conversion must give back)."""
    import gguf

    if kind == "F32":
        return data.astype(np.float32)
    if kind == "F16":
        return data.astype(np.float16).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    return gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)


def run_tool(*args: str) -> int:
    """Run tools/convert_checkpoint.py's main() in this process."""
    import importlib.util

    tool_path = REPO_ROOT / "tools" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main([str(a) for a in args])


# -- training frameworks (Megatron, DeepSpeed) ------------------------------------------------


def write_sentencepiece_model(path: Path, vocab_size: int = 256) -> Path:
    """A BPE SentencePiece model as Megatron's GPTSentencePieceTokenizer reads it (<unk>=0,
    <s>=1, </s>=2, like the tiny LLaMA models' ids)."""
    import sentencepiece as spm

    words = [f"w{i}" for i in range(400)]
    text = [" ".join(words[j : j + 7]) + " the quick brown fox" for j in range(0, 400, 3)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    return path.with_suffix(".model")


def write_megatron_legacy(hf_model, out: Path, args, tp: int, pp: int, iteration: int = 20) -> Path:
    """A Megatron-LM `--ckpt-format torch` save of `hf_model` by a TP x PP run with the
    Transformer-Engine layer spec, built by slicing its weights the way Megatron's parallel
    layers hold them (written out here from Megatron's conventions, not from our converter):
    fused QKV rows per KV group [its query heads; its key; its value], a rank holding whole
    groups; fc1 per rank [its gate rows; its up rows]; linear_proj / fc2 split by columns;
    the vocabulary padded to args.padded_vocab_size with random rows; stage p holding layers
    p*L/pp... numbered from 0, the embedding on the first stage, the final norm and output
    layer on the last."""
    c, hf = hf_model.config, hf_model.state_dict()
    heads, kv, hidden = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    d, qpk, ffn, vocab = hidden // heads, heads // kv, c.intermediate_size, c.vocab_size
    padded = args.padded_vocab_size
    generator = torch.Generator().manual_seed(7)

    def padded_vocab(w):
        return torch.cat([w, torch.randn(padded - vocab, hidden, generator=generator)])

    embedding, output = padded_vocab(hf["model.embed_tokens.weight"]), padded_vocab(hf["lm_head.weight"])
    per_stage = c.num_hidden_layers // pp
    iteration_dir = out / f"iter_{iteration:07d}"
    for t in range(tp):
        vocab_rows = slice(t * padded // tp, (t + 1) * padded // tp)
        ffn_rows = slice(t * ffn // tp, (t + 1) * ffn // tp)
        head_cols = slice(t * heads * d // tp, (t + 1) * heads * d // tp)
        for p in range(pp):
            model = {}
            if p == 0:
                model["embedding.word_embeddings.weight"] = embedding[vocab_rows].clone()
            for local in range(per_stage):
                h, m = f"model.layers.{p * per_stage + local}.", f"decoder.layers.{local}."
                q, k, v = (hf[h + f"self_attn.{x}_proj.weight"] for x in "qkv")
                qkv = []
                for g in range(t * kv // tp, (t + 1) * kv // tp):
                    qkv += [q[g * qpk * d : (g + 1) * qpk * d], k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
                model[m + "self_attention.linear_qkv.layer_norm_weight"] = hf[h + "input_layernorm.weight"].clone()
                model[m + "self_attention.linear_qkv.weight"] = torch.cat(qkv)
                model[m + "self_attention.linear_qkv._extra_state"] = None
                model[m + "self_attention.linear_proj.weight"] = hf[h + "self_attn.o_proj.weight"][:, head_cols].clone()
                model[m + "mlp.linear_fc1.layer_norm_weight"] = hf[h + "post_attention_layernorm.weight"].clone()
                gate, up = hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]
                model[m + "mlp.linear_fc1.weight"] = torch.cat([gate[ffn_rows], up[ffn_rows]])
                model[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"][:, ffn_rows].clone()
            if p == pp - 1:
                model["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
                model["output_layer.weight"] = output[vocab_rows].clone()
            rank_dir = iteration_dir / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
            rank_dir.mkdir(parents=True)
            state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model}
            torch.save(state, rank_dir / "model_optim_rng.pt")
    (out / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return out


class FrameworkCheckpoints:
    """Checkpoints saved by Megatron-core / Megatron-LM conventions and by DeepSpeed, their
    conversions, and what the engine generated from each (shared by
    test_checkpoint_megatron.py and test_checkpoint_deepspeed.py; built once per session by
    the `frameworks` fixture in conftest.py).

    sources[name]    the saved checkpoint's directory (--input)
    converted[name]  its canonical checkpoint, converted with tools/convert_checkpoint.py
    served[name]     {"tokens", "logits"} generated from it (TP=2 + 1 attention worker) for
                     the greedy requests, conftest.REQUESTS[:SERVED_REQUESTS]
    reference[name]  the tiny transformers model it holds (conftest.TinyModel)
    """

    SERVED_REQUESTS = 4  # conftest.REQUESTS[:4]: each prompt once, greedy
    SERVE_LAYOUT = (
        "parallel.tensor_parallel=2", "parallel.attention_workers=1", "parallel.attention_head_groups=1",
        "kv_cache.block_size=4", "kv_cache.num_blocks=32", "scheduler.max_prefill_tokens=8",
    )  # fmt: skip

    def __init__(self, root: Path, tiny_models: dict):
        import subprocess

        self.root = root
        untied, tied = tiny_models["untied"], tiny_models["tied"]
        self.tokenizer_model = write_sentencepiece_model(root / "tokenizer.model")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        log_path = root / "ckpt_save.log"  # a file, not a pipe: a full pipe would stall the savers
        args = [root, untied.canonical_dir, self.tokenizer_model, tied.hf_dir]
        with open(log_path, "w") as log:  # the savers run while this process slices one by hand
            saver = subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "tests" / "ckpt_save.py"), *map(str, args)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
            self._write_legacy_tp2_pp2(untied)
            saver.wait(timeout=600)
        assert saver.returncode == 0, log_path.read_text()[-3000:]

        megatron, deepspeed = root / "megatron", root / "deepspeed"
        self.sources = {
            "torch_dist": megatron / "torch_dist",
            "torch_dist_per_layer": megatron / "torch_dist_per_layer" / "iter_0000010",
            "legacy_tp2": megatron / "legacy_tp2",
            "legacy_tp2_pp2": megatron / "legacy_tp2_pp2",
            "mcore_no_args": megatron / "mcore_no_args",
            "torch_dist_wrapped": megatron / "torch_dist_wrapped",
            "zero1": deepspeed / "zero1",
            "zero2": deepspeed / "zero2",
            "zero3": deepspeed / "zero3",
            "megatron_deepspeed": deepspeed / "megatron_deepspeed",
        }
        self.reference = {
            name: (tied if name.startswith(("zero", "megatron_deepspeed")) else untied) for name in self.sources
        }
        model_config = root / "megatron_args.json"  # what the bare megatron-core save lacks
        model_config.write_text(json.dumps(vars(self._megatron_args(untied, tp=2, pp=1)), default=str))
        options = {  # exercise each way of naming the tokenizer and the architecture
            "torch_dist": ["--tokenizer", untied.hf_dir, "--name", "tiny-megatron"],
            "torch_dist_per_layer": ["--tokenizer", self.tokenizer_model],
            "legacy_tp2": [],  # the tokenizer_model named in the stored args
            "legacy_tp2_pp2": ["--tokenizer", self.tokenizer_model],
            "mcore_no_args": ["--tokenizer", self.tokenizer_model, "--model-config", model_config],
            "torch_dist_wrapped": ["--tokenizer", self.tokenizer_model],
            "zero1": [],  # config.json and tokenizer beside `latest`, as HF Trainer saves them
            "zero2": [],  # --input is the global_step1 dir itself (see below)
            "zero3": ["--model-config", tied.hf_dir / "config.json", "--tokenizer", tied.hf_dir],
            "megatron_deepspeed": ["--tokenizer", tied.hf_dir],
        }
        self.converted = {}
        inputs = {**self.sources, "zero2": self.sources["zero2"] / "global_step1"}
        for name, source in inputs.items():
            out = root / "converted" / name
            kind = "deepspeed" if name in ("zero1", "zero2", "zero3", "megatron_deepspeed") else "megatron"
            assert run_tool("--source", kind, "--input", source, "--output", out, *options[name]) == 0, name
            self.converted[name] = out

        from conftest import REQUESTS
        from layout_job import generate_on_ranks
        from spawn_ranks import run_ranks

        # These hold torch_dist's tensors in other keys; their conversions are compared with
        # it tensor for tensor.
        served = [name for name in self.converted
                  if name not in ("mcore_no_args", "torch_dist_per_layer", "torch_dist_wrapped")]
        cases = [(str(self.converted[name]), list(self.SERVE_LAYOUT)) for name in served]
        results = run_ranks(generate_on_ranks, 3, cases, REQUESTS[: self.SERVED_REQUESTS])
        self.served = dict(zip(served, results))

    def _megatron_args(self, model, tp: int, pp: int):
        from ckpt_save_megatron import megatron_lm_args

        from megatron_lamina.architecture import read_architecture

        arch = read_architecture(model.canonical_dir)
        return megatron_lm_args(arch, str(self.tokenizer_model), tp=tp, pp=pp, ckpt_format="torch")

    def _write_legacy_tp2_pp2(self, model) -> None:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(model.hf_dir, dtype=torch.float32)
        args = self._megatron_args(model, tp=2, pp=2)
        write_megatron_legacy(hf_model, self.root / "megatron" / "legacy_tp2_pp2", args, tp=2, pp=2)


def assert_served_matches_transformers(frameworks, name: str) -> None:
    """The converted checkpoint `name`, served by our engine, gives the source model's greedy
    tokens and, step by step, its logits within 1e-4 (float32)."""
    import torch

    served, reference = frameworks.served[name], frameworks.reference[name]
    n = frameworks.SERVED_REQUESTS  # the greedy requests of conftest.REQUESTS
    assert len(served["tokens"]) == n and served["tokens"] == reference.tokens[:n]
    for got, want in zip(served["logits"], reference.logits[:n]):
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (name, (got - want).abs().max())
