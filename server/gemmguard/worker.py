"""Worker extension: methods vLLM mixes into every worker (every TP/PP rank).

`gemmguard serve` passes `--worker-extension-cls gemmguard.worker.GemmguardWorkerExtension`;
the API server reaches these methods by name with `engine_client.collective_rpc`.
Results cross a msgspec boundary, so they are plain dicts of str/int/float.
"""

from __future__ import annotations

from typing import Any

from gemmguard.build import build_info

EXTENSION_CLS = "gemmguard.worker.GemmguardWorkerExtension"


class GemmguardWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    rank: Any

    def gemmguard_build_info(self) -> dict[str, Any]:
        """This rank's versions, platform and device."""
        info: dict[str, Any] = dict(build_info())
        info["rank"] = int(getattr(self, "rank", 0))
        return info

    def gemmguard_kernel_report(self) -> list[dict[str, Any]]:
        """Every GEMM-owning layer of this rank: its kernel and the candidates turned down."""
        from gemmguard.inventory.report import kernel_report

        rows = kernel_report(self.get_model())  # type: ignore[attr-defined]
        rank = int(getattr(self, "rank", 0))
        for row in rows:
            row["rank"] = rank
        return rows

    def gemmguard_selfcheck(self) -> dict[str, Any]:
        """This rank's self-check, run at load (see selfcheck.load_check)."""
        from gemmguard.selfcheck.load_check import rank_check

        return rank_check().as_dict(int(getattr(self, "rank", 0)))

    def gemmguard_fixes(self) -> list[dict[str, str]]:
        """This rank's engine fixes: upstream, patched, missing or not_applicable."""
        from gemmguard import fixes

        return fixes.report()
