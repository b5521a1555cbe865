"""The batch job (`lamina generate`), beside server/: a JSONL file of requests in, one output
record per line out, resumable. Its loop runs on the driver (rank 0)."""
