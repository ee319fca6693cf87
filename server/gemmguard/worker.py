"""Worker extension: methods vLLM mixes into every worker (every TP/PP rank of every engine).

`gemmguard serve` passes `--worker-extension-cls gemmguard.worker.GemmguardWorkerExtension`;
the API server reaches these methods by name on every data-parallel engine
(`vllm_adapter.collective_rpc_every_engine`). Results cross a msgspec boundary, so they are
plain dicts of str/int/float. `rank` is the worker's rank across all engines (data-parallel
rank × ranks per engine + rank in the engine), so the ranks of two engines never share a number;
`data_parallel_rank` names the engine.
"""

from __future__ import annotations

from typing import Any

from gemmguard.build import build_info

EXTENSION_CLS = "gemmguard.worker.GemmguardWorkerExtension"


class GemmguardWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    rank: Any
    parallel_config: Any

    def _gemmguard_ranks(self) -> dict[str, int]:
        """This worker's rank across every engine, and its engine's data-parallel rank."""
        from gemmguard import vllm_adapter

        config = getattr(self, "parallel_config", None)
        return {"rank": vllm_adapter.rank_across_engines(int(getattr(self, "rank", 0)), config),
                "data_parallel_rank": vllm_adapter.data_parallel_index(config)}

    def gemmguard_build_info(self) -> dict[str, Any]:
        """This rank's versions, platform and device."""
        info: dict[str, Any] = dict(build_info())
        info.update(self._gemmguard_ranks())
        return info

    def gemmguard_kernel_report(self) -> list[dict[str, Any]]:
        """Every GEMM-owning layer of this rank: its kernel and the candidates turned down."""
        from gemmguard.inventory.report import kernel_report

        # A mixin: get_model is the vLLM worker's, which `self` is at run time.
        rows = kernel_report(self.get_model())  # type: ignore[attr-defined]
        ranks = self._gemmguard_ranks()
        for row in rows:
            row.update(ranks)
        return rows

    def gemmguard_selfcheck(self) -> dict[str, Any]:
        """This rank's self-check, run at load (see selfcheck.load_check)."""
        from gemmguard import vllm_adapter
        from gemmguard.selfcheck.load_check import rank_check

        ranks = self._gemmguard_ranks()
        # The model this worker serves: one its loader kept from the check is reported unseen.
        model = self.get_model()  # type: ignore[attr-defined]
        check = rank_check(model, vllm_adapter.load_format(getattr(self, "vllm_config", None)))
        return {**check.as_dict(ranks["rank"]), **ranks}

    def gemmguard_fixes(self) -> list[dict[str, str]]:
        """This rank's engine fixes: upstream, patched, missing, not_applicable or unknown."""
        from gemmguard import fixes

        return fixes.report()
