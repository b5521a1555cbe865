"""Builders of tiny source checkpoints for the checkpoint tests (nothing is downloaded).

`tiny_tokenizer()` trains a byte-level BPE in memory and wraps it with a chat template;
`save_tiny_hf_model(...)` writes a random transformers LLaMA/Qwen2 model plus that tokenizer
the way `save_pretrained` does (or as an old-style pytorch_model.bin); `write_tiny_gguf(...)`
writes a llama GGUF from a HF state dict the way llama.cpp's converter does (Q/K rows
permuted for its RoPE, chosen tensors F16 or quantized). Imported by tests/test_checkpoint_*.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

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
