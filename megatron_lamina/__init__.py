"""megatron-lamina: LLM decode serving with model-attention disaggregation, on Megatron-core.

`megatron_lamina.LLM` (megatron_lamina/llm.py) is the offline Python API, with
`megatron_lamina.SamplingParams`; both are imported on first use, so that
`import megatron_lamina` stays light for the launchers and tools.

Apex and Transformer-Engine are optional accelerators here; Megatron-core warns at import
when they are missing, once per module and rank, which buries a job's own output. Those
specific warnings are silenced; every other warning shows as usual.
"""

import warnings

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)
warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)


def __getattr__(name: str):
    if name == "LLM":
        from megatron_lamina.llm import LLM

        return LLM
    if name == "SamplingParams":
        from megatron_lamina.requests.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'megatron_lamina' has no attribute {name!r}")
