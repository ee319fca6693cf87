"""What a process runs on: gemmguard, vLLM and torch versions, platform and device, how that
vLLM was verified, and the hooks that could not attach to it."""

from __future__ import annotations

import platform as host_platform
from pathlib import Path

import gemmguard
from gemmguard import ledger, vllm_adapter


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return host_platform.processor() or host_platform.machine()


def device_name() -> str:
    """The accelerator this process computes on (the CPU's model name on CPU builds)."""
    import torch

    if torch.cuda.is_available():
        return str(torch.cuda.get_device_name(torch.cuda.current_device()))
    return _cpu_model()


def build_info() -> dict[str, str]:
    """Versions, platform and device of this process, as plain strings (RPC-safe)."""
    import torch

    plat = vllm_adapter.current_platform()
    return {
        "version": gemmguard.__version__,
        "vllm_version": vllm_adapter.installed_vllm_version() or "unknown",
        "vllm_distribution": vllm_adapter.installed_vllm_distribution() or "unknown",
        "vllm_verified": vllm_adapter.vllm_verification(),
        "torch_version": str(torch.__version__),
        "platform": str(getattr(plat, "device_type", "") or type(plat).__name__),
        "device": device_name(),
        # Comma-separated, sorted: the hooks of gemmguard.ledger that found nothing to attach to.
        "hooks_missing": ",".join(sorted(ledger.missing())),
    }
