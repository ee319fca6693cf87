"""Start-up self-check: each layer's chosen kernel against a reference GEMM from the checkpoint."""
