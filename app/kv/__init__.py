"""vLLM's KV-cache formats, which engines and routers both speak: block hashes (the prefix keys), KV-event
batches, and approximate text keys for servers the gateway cannot tokenize for. Pure functions, no I/O."""
