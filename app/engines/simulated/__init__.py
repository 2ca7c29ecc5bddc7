"""A simulated vLLM engine: continuous batching, a paged KV cache with prefix caching, vLLM's
metrics, deterministic and able to run faster than real time."""
