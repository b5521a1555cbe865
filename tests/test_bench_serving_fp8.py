"""tools/serving_benchmark.py's FP8 modes (issue 26) on CPU: `--modes bf16,fp8` runs one
server per mode over the same checkpoint (fp8: its weights quantized at load and an FP8 KV
cache), `--weights-at-load` serves random weights drawn at load (no weights written), and
`--closed auto` sends as many requests as the server's KV cache holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_lamina.bench.serving_benchmark import main

ROOT = Path(__file__).resolve().parents[1]


def test_serving_benchmark_runs_bf16_and_fp8_on_weights_drawn_at_load(tmp_path):
    out = tmp_path / "out"
    # 10 blocks of 16 tokens; a request of 16 + 6 tokens takes 2 blocks: the cache holds 5.
    assert main(["--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--checkpoint", str(tmp_path / "spec"),
                 "--weights-at-load", "--modes", "bf16,fp8", "--config", str(ROOT / "configs" / "default.yaml"),
                 "--set", "runtime.device=cpu", "--set", "parallel.attention_workers=0",
                 "--set", "scheduler.max_batch_size=8", "--set", "kv_cache.num_blocks=10",
                 "--closed", "auto", "--input-len", "16", "--output-len", "6", "--trace-requests", "0",
                 "--phases", "checkpoint,server", "--out-dir", str(out)]) == 0
    result = json.loads((out / "serving_benchmark.json").read_text())
    assert not [k for k in result if k.endswith("_error")], result
    assert (tmp_path / "spec" / "model.safetensors").stat().st_size <= 64   # no weights on disk
    assert list(result["modes"]) == ["bf16", "fp8"] and result["server"] == result["modes"]["bf16"]
    for mode, logged in (("bf16", "KV cache (float32)"), ("fp8", "KV cache (fp8_e4m3)")):
        run = result["modes"][mode]
        assert run["closed_requests"] == 5 and run["closed"]["completed"] == 5 and run["closed"]["failed"] == 0
        assert any(logged in line for line in run["startup_log"]), run["startup_log"]
        assert (out / mode / "bench-closed.json").is_file()
    weights = [line for line in result["modes"]["fp8"]["startup_log"] if "weights loaded" in line]
    assert weights and "fp8_e4m3 (quantized at load), random (drawn at load)" in weights[0]
