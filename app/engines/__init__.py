"""Engine kinds, one folder each (simulated, vllm, external), registered in `kinds.py`: what runs or reaches
an engine and serves its own OpenAI server. Knows nothing of routing or of the gateway's API."""
