"""The request contract, shared by every caller of the engine: what a caller asks (prompts, the
request schema, sampling parameters as data, structured-output constraints), what it gets back
(output deltas), the text codec, and the link between the HTTP front end and the engine process.
The HTTP front end, the batch job and `megatron_lamina.LLM` import it; it imports nothing from
the driver or the workers."""
