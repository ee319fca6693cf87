"""Which kernel each layer runs, and which candidates vLLM turned down for it, and why."""
