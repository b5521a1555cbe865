"""The driver: rank 0's engine (requests in, tokens out, one step at a time): the scheduler and
block manager with the prefix cache, the sampler and log-probabilities, grammar masks, and the
engine loop a server runs. Only rank 0 runs it; it sends every other rank a plan per step."""
