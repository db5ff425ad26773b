"""vllm-dp-supervisor: one vLLM server per local rank, probed, served, and stopped cleanly."""
