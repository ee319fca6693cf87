"""Test-only: a model loader that post-processes the weights past the self-check, as real ones do.

vLLM's GGUF loader and its weight-cache loaders call their own reference to vLLM's
post-processing walk (`model_loader.utils.process_weights_after_loading`), not the one in
`base_loader` that gemmguard wraps: the check never sees their layers. This loader is vLLM's
default loader doing the same, so tests can prove that such a model is reported `unchecked`
(not seen by the check) on every GEMM it holds, never passed.

Registered under the load format `gemmguard-test-bypass` only when GEMMGUARD_TEST_LOADER=bypass.
"""

from __future__ import annotations

import copy
from typing import Any

LOAD_FORMAT = "gemmguard-test-bypass"


def register() -> None:
    """Register the loader with vLLM's own loader registry (idempotent)."""
    import torch
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader import utils as loader_utils
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.utils.torch_utils import set_default_torch_dtype

    class BypassingLoader(DefaultModelLoader):
        """vLLM's default loader with its own call of vLLM's post-processing walk."""

        def __init__(self, load_config: Any) -> None:
            # The default loader reads the files by load format: ours reads what "auto" does.
            config = copy.copy(load_config)
            config.load_format = "auto"
            super().__init__(config)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
            device = torch.device(vllm_config.load_config.device
                                  or vllm_config.device_config.device)
            with set_default_torch_dtype(model_config.dtype), device:
                model = self.create_model(vllm_config=vllm_config, model_config=model_config,
                                          prefix=prefix)
                self.load_weights(model, model_config)
                loader_utils.process_weights_after_loading(model, model_config, device)
            return model.eval()

    register_model_loader(LOAD_FORMAT)(BypassingLoader)
