"""Real vLLM engines (GPU, TPU and CPU builds), each run as a managed `vllm serve` child process."""
