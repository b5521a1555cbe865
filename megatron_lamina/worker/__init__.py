"""The worker side that every rank runs: start-up, the model and attention workers built from the
config, the control plane that receives the driver's plans, the staggered pipeline, step inputs,
block tables, the KV cache's memory and host tier, and the CUDA graphs."""
