"""megatron-lamina: LLM decode serving with model-attention disaggregation, on Megatron-core.

Apex and Transformer-Engine are optional accelerators here; Megatron-core warns at import
when they are missing, once per module and rank, which buries a job's own output. Those
specific warnings are silenced; every other warning shows as usual.
"""

import warnings

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)
warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
