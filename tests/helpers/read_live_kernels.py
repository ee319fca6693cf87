"""Load a model in this process and print, from the live layer objects, each layer's kernel.

Reads vLLM's own attributes directly (not gemmguard's report) so a test can compare the two.
Usage: python read_live_kernels.py MODEL
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # keep the model in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_PLUGINS"] = "gemmguard"  # same candidate lists as the server
    from vllm import LLM

    llm = LLM(sys.argv[1], enforce_eager=True, max_model_len=512,
              distributed_executor_backend="uni")

    def read(model):  # type: ignore[no-untyped-def]
        out = {}
        for name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            kernel = getattr(method, "fp8_linear", None)
            if kernel is not None:
                out[name] = type(kernel).__name__
        return out

    print("LIVE=" + json.dumps(llm.apply_model(read)[0]))


if __name__ == "__main__":
    main()
