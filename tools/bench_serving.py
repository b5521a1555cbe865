"""Serving benchmark against any OpenAI-compatible completions endpoint: a trace replay or a
closed batch (`--help`). The program is megatron_lamina/bench/serving_replay.py.

    python tools/bench_serving.py --url http://127.0.0.1:8000 \\
        --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv --max-requests 200 --out out/bench.json
"""

import sys

from megatron_lamina.bench.serving_replay import main

if __name__ == "__main__":
    sys.exit(main())
