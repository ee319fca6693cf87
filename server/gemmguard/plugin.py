"""vLLM general plugin: runs in every vLLM process (API server, engine core, workers).

vLLM may call `register` more than once per process, so everything here is idempotent.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("gemmguard")

_REGISTERED = False


def register() -> None:
    """Entry point of `vllm.general_plugins`: install gemmguard's engine-side hooks once."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    logger.debug("gemmguard general plugin loaded")
