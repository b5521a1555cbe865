"""OpenAI-compatible HTTP API on the driver rank, and its Prometheus metrics."""
