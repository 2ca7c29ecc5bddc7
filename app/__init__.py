"""An LLM-aware, OpenAI-compatible inference gateway on Ray Serve."""
