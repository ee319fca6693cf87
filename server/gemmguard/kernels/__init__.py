"""Kernels gemmguard adds to vLLM's candidate lists."""
