"""Driver-side engine: requests, scheduler and block manager, pipeline driver, sampler, LLM API."""
