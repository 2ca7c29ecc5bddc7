"""The OpenAI-compatible API: request/response models, errors, the serving logic that turns
requests into engine calls, and the HTTP layer. Used by the Serve ingress and by the simulated
engine's standalone server alike."""
