"""OpenAI-compatible servers the gateway routes to but does not run (vLLM pods, VMs)."""
