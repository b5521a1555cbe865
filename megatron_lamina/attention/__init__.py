"""Attention-worker side: the paged KV cache and the attention kernels that read it."""
