"""The self-check at load: the one place that samples, checks, replaces and refuses.

vLLM's loader calls `process_weights_after_loading(model, …)`, which walks every module and
asks its quant method to post-process the weights for the chosen kernel. gemmguard wraps
that walk: for each GEMM-owning layer it samples the checkpoint tensors, lets vLLM
post-process, runs the layer's kernel against the fp32 reference at once (before
torch.compile and CUDA-graph capture), and then acts on the verdict by the policy:

- `warn`: keep the kernel, report it.
- `fallback`: swap the layer's kernel in place for the fastest candidate of vLLM's own
  chooser that passes (the failing one turned down with reason `selfcheck`), re-running the
  post-processing from the layer's kept checkpoint tensors (an unquantized MoE layer: its
  whole path, chosen again by vLLM's MoE oracle). A kernel that cannot be swapped in place
  (quantized MoE experts, mixed-precision kernels), or a layer for which no candidate
  passes, refuses start-up: there is no restart, the report names the kernels to deny.
- `fail`: refuse start-up with the report.

Refusing raises `SelfcheckFailed` in the loader, so the engine never serves, and leaves the
report where `gemmguard serve` reads it (exit code 3). Every rank checks the layers it holds.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from gemmguard import ledger, vllm_adapter
from gemmguard.inventory import report
from gemmguard.inventory.selection import SELFCHECK, SLOWER, forget_moe_selection, turned_down
from gemmguard.kernels.portable_fp8_block import PORTABLE_KERNEL_NAMES
from gemmguard.selfcheck import measure, recording, replacement, sample, schemes
from gemmguard.selfcheck.coverage import Coverage, reconcile
from gemmguard.selfcheck.measure import FAILING, LayerResult
from gemmguard.vllm_adapter import fixes as vllm_fixes
from gemmguard.vllm_adapter import layer as vllm_layer
from gemmguard.vllm_adapter import moe as vllm_moe

logger = logging.getLogger("vllm.gemmguard")


@dataclass(frozen=True)
class CheckConfig:
    """What the check does with its verdicts (from gemmguard's settings)."""

    policy: str = "fallback"  # warn | fallback | fail
    unchecked: str = "warn"  # allow | warn | fail
    report_file: str = ""
    seed: int = 0


@dataclass(frozen=True)
class Decision:
    """The replacement the first layer of a (rejected kernel, scheme, shape) measured and chose."""

    layer: str  # that first layer
    kernel: str  # the winning kernel
    reasons: dict[str, str]  # every other candidate turned down: vLLM's chooser then gives it
    cost_ratio: float | None  # its time over the rejected kernel's on that shape


@dataclass
class RankCheck:
    """This process's check: every GEMM-owning layer's result, in load order."""

    config: CheckConfig = field(default_factory=CheckConfig)
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0
    # Where `seconds` went (capture, keep, inventory, kernel, reference, replace): a start-up
    # that the check slows down says which part to make faster.
    phases: dict[str, float] = field(default_factory=dict)
    sample_bytes: int = 0
    model_bytes: int = 0
    refusal: str = ""
    # The digest of every layer's kernel, put into vLLM's compile cache key (None: not keyed).
    compile_key: str | None = None
    # (rejected kernel, scheme, shape) → the replacement that won there, so layers of the same
    # kernel and shape take it without measuring and timing every candidate again.
    decisions: dict[tuple[str, str, tuple[int, ...]], Decision] = field(default_factory=dict)
    # Keeps the kernels' outputs for replay on other machines (GEMMGUARD_RECORD_DIR).
    recorder: recording.Recorder | None = None
    # The GEMM-owning modules of the model, reconciled with the rows (selfcheck.coverage).
    coverage: Coverage = field(default_factory=Coverage)
    # How vLLM re-quantized the weights at load, whatever kernel then runs them: "e8m0" (FP8
    # block scales to powers of two, with DeepGEMM on), else "". The refusal's advice reads it.
    requant: str = ""

    def start(self, model: torch.nn.Module) -> None:
        """Begin the check of a newly loaded model (results of an earlier load dropped)."""
        self.layers.clear()
        self.seconds, self.sample_bytes, self.phases = 0.0, 0, {}
        self.model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.requant = "e8m0" if vllm_fixes.deep_gemm_e8m0_used() else ""

    def as_dict(self, rank: int) -> dict[str, Any]:
        return {"rank": rank, "seconds": round(self.seconds, 4),
                "phase_seconds": {k: round(v, 4) for k, v in self.phases.items()},
                "sample_bytes": self.sample_bytes, "model_bytes": self.model_bytes,
                **self.coverage.as_dict(),
                "refusal": self.refusal, "compile_cache_key": self.compile_key,
                "requant": self.requant,
                "layers": [r.as_dict() for r in self.layers]}


_CHECK = RankCheck()


# Set on a model the check walked, so that a model loaded past the check is told apart.
CHECKED_MARK = "_gemmguard_selfchecked"


def rank_check(model: torch.nn.Module | None = None, loader: str = "unknown") -> RankCheck:
    """The check this process ran at load of `model` (empty before the model is loaded).

    A model whose loader never called the post-processing walk gemmguard wraps gets its check
    now: every GEMM-owning module `unchecked`, not seen by the check, and a refusal where
    --selfcheck-unchecked fail says so. The API server then refuses to serve.
    """
    if model is None or getattr(model, CHECKED_MARK, False):
        return _CHECK
    check = _CHECK
    check.start(model)
    check.coverage = reconcile(check.layers, model, loader)
    check.refusal = refusal(check)
    object.__setattr__(model, CHECKED_MARK, True)
    logger.warning("gemmguard: the self-check never ran: loader %s did not post-process the "
                   "weights through the step gemmguard checks; %d GEMM-owning module(s) are "
                   "unchecked (--selfcheck-unchecked %s)", loader, check.coverage.held,
                   check.config.unchecked)
    return check


def _layer_type(module: Any) -> str | None:
    if isinstance(module, vllm_adapter.lm_head_class()):
        return "lm_head"
    if isinstance(module, vllm_adapter.linear_base()):
        return "linear"
    moe = vllm_adapter.moe_layer_classes()
    if moe and isinstance(module, moe):
        return "moe"
    return None


def _rejection(rejected: LayerResult) -> dict[str, Any]:
    """What a replacement record says of the kernel the check rejected."""
    return {"rejected": rejected.kernel, "rejected_verdict": rejected.verdict,
            "rejected_excess_bits": rejected.excess_bits, "rejected_bits": rejected.bits}


def _kernel_classes(name: str) -> list[str]:
    """`A[B|C]` (a kernel that picks a part per call) → A, B and C."""
    names = [name.split("[")[0]]
    if "[" in name:
        names += name[name.index("[") + 1:].rstrip("]").split("|")
    return names


class LayerCheck:
    """One layer's check around its post-processing."""

    def __init__(self, check: RankCheck, name: str, module: Any, layer_type: str,
                 post_process: Any) -> None:
        self.check, self.name, self.module, self.layer_type = check, name, module, layer_type
        self.post_process = post_process

    def _kernel_and_scheme(self) -> tuple[str, str]:
        if self.layer_type == "moe":
            row = report.moe_row(self.name, self.module)
        else:
            row = report.linear_row(self.name, self.module, self.layer_type)
        return row["kernel"], row["scheme"]

    def _capture(self) -> Any:
        if self.layer_type == "moe":
            return sample.capture_moe(self.name, self.module, self.check.config.seed)
        kernel = vllm_layer.linear_kernel(self.module)
        scheme = report.scheme_of(kernel, vllm_layer.tensor(self.module, "weight"), self.module)
        return sample.capture_linear(self.name, self.module, kernel, scheme)

    def _measure(self, taken: Any, kernel: str,
                 phases: dict[str, float] | None = None) -> LayerResult:
        if self.layer_type == "moe":
            return measure.check_moe(self.module, taken, kernel, self.check.config.seed,
                                     phases=phases)
        return measure.check_linear(self.module, taken, kernel, self.layer_type,
                                    self.check.config.seed, phases=phases)

    def _phase(self, name: str, since: float) -> float:
        return measure.add_phase(self.check.phases, name, since)

    def run(self) -> None:
        # vLLM loads under a bf16 default dtype; the check's fp32 references must not inherit it.
        saved = torch.get_default_dtype()
        post_process = self.post_process

        def post_process_as_vllm(module: Any) -> None:
            torch.set_default_dtype(saved)  # vLLM's own post-processing runs as it would
            try:
                post_process(module)
            finally:
                torch.set_default_dtype(torch.float32)

        self.post_process = post_process_as_vllm
        self.vllm_dtype = saved
        torch.set_default_dtype(torch.float32)
        try:
            self._run()
        finally:
            torch.set_default_dtype(saved)
            self.post_process = post_process

    def _run(self) -> None:
        # The check's own time: sampling, keeping the tensors, measuring and replacing; not
        # vLLM's first post-processing of the layer, which runs with or without gemmguard.
        start = time.perf_counter()
        try:
            taken, reason = self._capture(), ""
        except schemes.Unchecked as exc:
            taken, reason = None, str(exc)
        now = self._phase("capture", start)
        policy = self.check.config.policy
        slot = replacement.slot_of(self.module) if self.layer_type != "moe" else None
        # Fallback keeps the checkpoint tensors of a layer whose path can be rebuilt in place
        # (an MoE layer's experts: the whole layer, released when the check is done with it).
        rebuildable = slot is not None if self.layer_type != "moe" else \
            vllm_moe.is_rebuildable_method(self.module)
        kept = replacement.KeptTensors.of(self.module) \
            if taken is not None and policy == "fallback" and rebuildable else None
        vllm_start = self._phase("keep", now)
        self.post_process(self.module)
        now = time.perf_counter()
        vllm_seconds = now - vllm_start
        kernel, scheme = self._kernel_and_scheme()
        now = self._phase("inventory", now)
        if taken is None:
            result = measure.unchecked(self.name, self.layer_type, kernel, scheme, reason)
        else:
            self.check.sample_bytes += taken.nbytes()
            try:
                # Replacement candidates are measured inside "replace", not here.
                result = self._measure(taken, kernel, self.check.phases)
            except schemes.Unchecked as exc:
                result = measure.unchecked(self.name, self.layer_type, kernel, scheme, str(exc))
            except Exception as exc:  # a check that cannot run must not stop the engine
                logger.exception("gemmguard: the self-check of %s could not run", self.name)
                result = measure.unchecked(self.name, self.layer_type, kernel, scheme,
                                           f"check failed: {type(exc).__name__}: {exc}"[:300])
            if self.check.recorder is not None and result.verdict != "unchecked":
                self.check.recorder.add(self.module, taken, kernel, self.layer_type, result)
            if result.verdict in FAILING and kept is not None:
                now = time.perf_counter()
                result = self._replace(taken, result, slot, kept) if slot is not None else \
                    self._replace_moe(taken, result, kept)
                self._phase("replace", now)
            elif result.verdict in FAILING and policy == "fallback":
                self._unswappable(result)
        self.check.seconds += time.perf_counter() - start - vllm_seconds
        self.check.layers.append(result)

    def _unswappable(self, rejected: LayerResult) -> None:
        """Record that this layer's failing kernel has no in-place replacement: start-up refuses.

        There is no restart to fall back on; the refusal's report names the kernel to deny.
        """
        rejected.replacement = {
            **_rejection(rejected), "candidates": [], "kernel": None, "swappable": False}
        rejected.reason = (f"{rejected.kernel} cannot be swapped in place (a {self.layer_type} "
                           "kernel gemmguard cannot rebuild yet); start again with --deny-kernel "
                           f"{_kernel_classes(rejected.kernel)[0]}")
        logger.warning("gemmguard: %s: %s %s; %s", self.name, rejected.kernel, rejected.verdict,
                       rejected.reason)

    def _post_process_with(self, method: Any) -> None:
        """Run a rebuilt quant method's own post-processing of this layer, as vLLM would."""
        torch.set_default_dtype(self.vllm_dtype)
        try:
            vllm_layer.post_process(method)(self.module)
        finally:
            torch.set_default_dtype(torch.float32)

    def _install_moe_path(self, reasons: dict[str, str], kept: replacement.KeptTensors,
                          new_experts: bool = True) -> str | None:
        """Have vLLM's oracle choose this MoE layer's path again with `reasons` turned down,
        and build it from the kept checkpoint tensors; the experts' name, or None if none
        (or, `new_experts`, none other than the experts the layer runs)."""
        forget_moe_selection(vllm_moe.moe_config_of(self.module))
        try:
            with turned_down(reasons):
                method = vllm_moe.rebuild_method(self.module, new_experts)
        except Exception as exc:  # the oracle has no candidate left (vLLM raises)
            logger.debug("gemmguard: %s: no further MoE candidate: %r", self.name, exc)
            return None
        if method is None:
            return None
        kept.restore(self.module)
        vllm_moe.install_method(self.module, method)
        self._post_process_with(method)
        return str(report.moe_row(self.name, self.module)["kernel"])

    def _replace_moe(self, taken: Any, rejected: LayerResult,
                     kept: replacement.KeptTensors) -> LayerResult:
        """Choose the MoE layer's path again (vLLM's oracle, the failing experts turned down),
        from its kept checkpoint tensors; keep the fastest that passes."""
        rejected_seconds = replacement.moe_seconds_per_call(self.module, taken)
        reasons = dict.fromkeys(_kernel_classes(rejected.kernel), SELFCHECK)
        tried: list[dict[str, Any]] = []
        passing: list[tuple[float, str]] = []
        while True:
            try:
                name = self._install_moe_path(reasons, kept)
                if name is None:
                    break
                result = self._measure(taken, name)
                seconds = replacement.moe_seconds_per_call(self.module, taken)
            except Exception as exc:  # a path that cannot run here is turned down too
                error = f"{type(exc).__name__}: {exc}"[:200]
                tried.append({"kernel": "unknown", "verdict": "error", "error": error})
                break
            tried.append({"kernel": name, "verdict": result.verdict,
                          "excess_bits": result.excess_bits, "seconds": round(seconds, 6)})
            if result.verdict == "pass":
                passing.append((seconds, name))
            for part in _kernel_classes(name):
                reasons.setdefault(part, SELFCHECK if result.verdict != "pass" else SLOWER)
        info: dict[str, Any] = {**_rejection(rejected), "candidates": tried,
                                # which experts the rejected kernel got wrong, for the report
                                "rejected_experts": [e for e in rejected.experts
                                                     if e.get("verdict") in FAILING]}
        if not passing:
            info["kernel"] = None
            rejected.replacement = info
            rejected.reason = ("no MoE experts path vLLM offers here passed the self-check; "
                               "start again with --deny-kernel "
                               f"{_kernel_classes(rejected.kernel)[0]} after choosing another "
                               "(--moe-backend), or --selfcheck-policy warn")
            return rejected
        seconds, best = min(passing)
        final = {part: reason for part, reason in reasons.items()
                 if part not in _kernel_classes(best)}
        chosen = self._install_moe_path(final, kept, new_experts=False)
        assert chosen == best, f"{best} passed but vLLM's oracle now chooses {chosen}"
        result = self._measure(taken, chosen)
        info.update(kernel=result.kernel, cost_ratio=round(seconds / rejected_seconds, 4)
                    if rejected_seconds > 0 else None)
        result.replacement = info
        failed = ", ".join(f"{e['expert']} {e['verdict']}" for e in info["rejected_experts"])
        logger.warning("gemmguard: %s: %s %s (excess %s bits%s); experts replaced by %s "
                       "(%.2fx its time)", self.name, rejected.kernel, rejected.verdict,
                       rejected.excess_bits, f"; experts {failed}" if failed else "",
                       result.kernel, info["cost_ratio"] or 0.0)
        return result

    def _take_decision(self, taken: Any, rejected: LayerResult, slot: replacement.KernelSlot,
                       kept: replacement.KeptTensors, decided: Decision) -> LayerResult | None:
        """Install the kernel an earlier layer of the same kernel, scheme and shape chose, and
        check it on this layer only; None (walk every candidate) if it does not pass here."""
        chosen = replacement.next_kernel(slot.kernel, decided.reasons)
        if chosen is None or report.kernel_name(chosen) != decided.kernel:
            return None
        replacement.install(self.module, slot, chosen, kept, self.post_process)
        result = self._measure(taken, decided.kernel)
        if result.verdict != "pass":
            return None
        taken_over = {"kernel": decided.kernel, "verdict": result.verdict,
                      "excess_bits": result.excess_bits, "decided_by": decided.layer}
        result.replacement = {**_rejection(rejected), "candidates": [taken_over],
                              "kernel": result.kernel, "cost_ratio": decided.cost_ratio}
        logger.info("gemmguard: %s: %s %s (excess %s bits); replaced by %s, as decided for %s "
                    "(same kernel, scheme and shape)", self.name, rejected.kernel,
                    rejected.verdict, rejected.excess_bits, result.kernel, decided.layer)
        return result

    def _replace(self, taken: Any, rejected: LayerResult, slot: replacement.KernelSlot,
                 kept: replacement.KeptTensors) -> LayerResult:
        """Try vLLM's next candidates in place; keep the fastest that passes."""
        k, dtype = taken.weight.shape[1], taken.out_dtype
        weight = vllm_layer.tensor(self.module, "weight")
        key = (rejected.kernel, rejected.scheme, tuple(weight.shape) if weight is not None else ())
        decided = self.check.decisions.get(key)
        if decided is not None:
            reused = self._take_decision(taken, rejected, slot, kept, decided)
            if reused is not None:
                return reused
        rejected_seconds = replacement.seconds_per_call(self.module, k, dtype)
        reasons = dict.fromkeys(_kernel_classes(rejected.kernel), SELFCHECK)
        tried: list[dict[str, Any]] = []
        winner = decided.kernel if decided is not None else None
        passing: list[tuple[float, str]] = []
        current = slot.kernel
        while True:
            candidate = replacement.next_kernel(current, reasons)
            if candidate is None:
                break
            name = report.kernel_name(candidate)
            try:
                replacement.install(self.module, slot, candidate, kept, self.post_process)
                result = self._measure(taken, name)
                seconds = replacement.seconds_per_call(self.module, k, dtype)
            except Exception as exc:  # e.g. a kernel whose library is not installed
                error = f"{type(exc).__name__}: {exc}"[:200]
                tried.append({"kernel": name, "verdict": "error", "error": error})
                for part in _kernel_classes(name):
                    reasons.setdefault(part, f"{SELFCHECK}: could not run ({error})")
                current = candidate
                continue
            tried.append({"kernel": name, "verdict": result.verdict,
                          "excess_bits": result.excess_bits, "seconds": round(seconds, 6)})
            if result.verdict == "pass":
                passing.append((seconds, name))
                if winner == name:
                    break  # the same shape chose it before: no need to time the rest
            for part in _kernel_classes(name):
                reasons.setdefault(part, SELFCHECK if result.verdict != "pass" else SLOWER)
            current = candidate
        info: dict[str, Any] = {**_rejection(rejected), "candidates": tried}
        if not passing:
            info["kernel"] = None
            rejected.replacement = info
            rejected.reason = "no candidate kernel of vLLM's passed the self-check"
            return rejected  # the layer's slot holds the last candidate tried; start-up refuses
        # vLLM's own kernels first: gemmguard's portable ones are the last resort (the dequant
        # kernel is quick at small batches but keeps the weights in bf16, twice the memory).
        own = [(t, n) for t, n in passing if n.split("[")[0] not in PORTABLE_KERNEL_NAMES]
        seconds, best = min(own or passing)
        # Rebuild the winner with every other candidate turned down, so the inventory records
        # why each was not taken.
        final_reasons = {part: reason for part, reason in reasons.items()
                         if part not in _kernel_classes(best)}
        chosen = replacement.next_kernel(slot.kernel, final_reasons)
        assert chosen is not None, f"{best} passed but vLLM no longer offers it"
        replacement.install(self.module, slot, chosen, kept, self.post_process)
        result = self._measure(taken, report.kernel_name(chosen))
        info.update(kernel=result.kernel, cost_ratio=round(seconds / rejected_seconds, 4)
                    if rejected_seconds > 0 else None)
        result.replacement = info
        self.check.decisions[key] = Decision(self.name, best, final_reasons, info["cost_ratio"])
        logger.warning("gemmguard: %s: %s %s (excess %s bits); replaced by %s (%.2fx its time)",
                       self.name, rejected.kernel, rejected.verdict, rejected.excess_bits,
                       result.kernel, info["cost_ratio"] or 0.0)
        return result


def _wrap_method(check: RankCheck, method: Any, layers: dict[int, tuple[str, str]]) -> None:
    """Shadow a quant method's post-processing with the checked one (instance-level).

    A method object may serve several layers; each call is checked for the layer it is given.
    """
    original = vllm_layer.post_process(method)

    @functools.wraps(original)
    def post_process(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if id(layer) not in layers:
            return original(layer, *args, **kwargs)
        name, layer_type = layers.pop(id(layer))
        LayerCheck(check, name, layer, layer_type,
                   lambda target: original(target, *args, **kwargs)).run()
        return None

    vllm_layer.wrap_post_processing(method, post_process)


def _wrap_model(check: RankCheck, model: torch.nn.Module) -> None:
    by_method: dict[int, tuple[Any, dict[int, tuple[str, str]]]] = {}
    for name, module in model.named_modules():
        method = vllm_layer.quant_method(module)
        layer_type = _layer_type(module) if method is not None else None
        if layer_type is not None:
            by_method.setdefault(id(method), (method, {}))[1][id(module)] = (name, layer_type)
    for method, layers in by_method.values():
        _wrap_method(check, method, layers)


def _unwrap(model: torch.nn.Module) -> None:
    for module in model.modules():
        vllm_layer.unwrap_post_processing(vllm_layer.quant_method(module))


def verdict_counts(layers: list[LayerResult]) -> dict[str, int]:
    counts = dict.fromkeys(measure.VERDICTS, 0)
    for layer in layers:
        counts[layer.verdict] += 1
    return counts


def refusal(check: RankCheck) -> str:
    """Why start-up must stop under the policy, or "" when the engine may serve."""
    config = check.config
    failing = [r for r in check.layers if r.verdict in FAILING]
    unchecked = [r for r in check.layers if r.verdict == "unchecked"]
    reasons = []
    if failing and config.policy != "warn":
        if config.policy == "fail":
            reasons.append(f"{len(failing)} layer(s) failed the self-check (policy fail)")
        else:
            fixed = [r for r in failing if (r.replacement or {}).get("swappable") is False]
            if fixed:
                reasons.append(f"{len(fixed)} layer(s) failed with a kernel that cannot be "
                               "swapped in place (" + ", ".join(
                                   sorted({r.kernel for r in fixed})) + ")")
            if len(fixed) < len(failing):
                reasons.append(f"{len(failing) - len(fixed)} layer(s) failed and no kernel "
                               "vLLM offers could replace theirs in place")
    if unchecked and config.unchecked == "fail":
        reasons.append(f"{len(unchecked)} layer(s) could not be checked (--selfcheck-unchecked "
                       "fail): " + ", ".join(f"{r.layer} ({r.reason})" for r in unchecked[:5]))
    return "; ".join(reasons)


COMPILE_KEY_PATCH = ledger.Patch(
    name="selfcheck-compile-cache-key",
    why="vLLM keys its torch.compile caches by configuration, not by the kernel each layer "
    "runs: a graph saved by a start whose layers ran one kernel would be loaded by a start "
    "whose check replaced it, and serve the rejected kernel while the report says replaced.",
    how="After the check, put a digest of every layer's kernel into "
    "VllmConfig.additional_config['gemmguard_kernels'], which vLLM hashes into its cache keys.",
    upstream="none: vLLM's cache key does not cover kernel selection.",
    remove_when="vLLM's compile cache key covers each layer's chosen kernel.",
)


def key_compile_cache(check: RankCheck) -> str | None:
    """Key vLLM's compile caches by the kernels the layers now run; the digest, or None."""
    kernels = "\n".join(f"{r.layer}={r.kernel}" for r in check.layers)
    digest = hashlib.sha256(kernels.encode()).hexdigest()
    if not vllm_adapter.key_compile_cache("gemmguard_kernels", digest):
        logger.warning("gemmguard: no vLLM config to key the compile cache with; a compiled "
                       "graph saved by an earlier start may not match the kernels checked now")
        return None
    ledger.record(COMPILE_KEY_PATCH)
    return digest


def finish(check: RankCheck, rank: int) -> None:
    """Log the rank's summary; refuse start-up (SelfcheckFailed) when the policy says so."""
    measure.forget_activations()  # every layer is checked: the shared inputs go
    counts = verdict_counts(check.layers)
    replaced = sum(1 for r in check.layers if r.replacement and r.replacement.get("kernel"))
    line = (f"gemmguard self-check (rank {rank}): {counts['pass']} pass, {counts['degraded']} "
            f"degraded, {counts['broken']} broken, {counts['unchecked']} unchecked, "
            f"{replaced} replaced in place, {check.seconds:.2f}s ("
            + ", ".join(f"{k} {v:.2f}s" for k, v in check.phases.items())
            + f"), policy {check.config.policy}")
    if counts["unchecked"]:
        line += f"; check incomplete (--selfcheck-unchecked {check.config.unchecked})"
    quiet = counts["unchecked"] == 0 or check.config.unchecked == "allow"
    (logger.info if quiet and not (counts["degraded"] or counts["broken"]) else logger.warning)(
        "%s", line)
    check.refusal = refusal(check)
    # A refusal on any rank stops every rank of the engine, each with the engine's whole report,
    # through vLLM's own process group: the leader's server must exit 3 with the report although
    # the failing layers sit on another node, whose disk it cannot read (issue 25).
    # A flag first: the whole reports cross the group only when some rank refuses.
    if not any(vllm_adapter.gather_engine_ranks(bool(check.refusal))):
        return
    reports = vllm_adapter.gather_engine_ranks(check.as_dict(rank))
    from gemmguard.selfcheck.policy import Outcome, refuse, summary

    outcome = Outcome(check.config.policy, reports, check.config.unchecked)
    logger.error("%s", summary(outcome))
    refuse(outcome, check.config.report_file, str(rank))


CHECK_PATCH = ledger.Patch(
    name="selfcheck-at-load",
    why="The self-check's reference must come from the checkpoint's own representation "
    "(kernels re-quantize or repack weights when post-processing), and a failing kernel must "
    "be replaced before torch.compile and CUDA graphs capture it.",
    how="Rebind process_weights_after_loading in vllm.model_executor.model_loader.base_loader "
    "(looked up there by name at call time); for the walk, shadow each GEMM layer's "
    "quant_method.process_weights_after_loading with one that samples, post-processes, checks "
    "and, under policy fallback, re-chooses the kernel through vLLM's own chooser.",
    upstream="none: vLLM keeps no copy of the checkpoint weights after post-processing and has "
    "no per-layer post-load hook.",
    remove_when="vLLM exposes a per-layer post-load hook and a kernel re-selection API.",
)
_INSTALLED = False


def _origin() -> dict[str, str]:
    """Where a recording is made: vLLM and torch versions, the device."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"vllm": vllm_adapter.installed_vllm_version() or "unknown",
            "torch": str(torch.__version__), "device": device}


def install(config: CheckConfig) -> None:
    """Wrap the loader's post-processing step once per process."""
    global _INSTALLED
    _CHECK.config = config
    if _INSTALLED:
        return
    _INSTALLED = True
    loader = vllm_adapter.loader_module()
    original = loader.process_weights_after_loading

    @functools.wraps(original)
    def process_weights_after_loading(model: Any, *args: Any, **kwargs: Any) -> Any:
        check = _CHECK
        check.start(model)
        check.recorder = recording.recorder_from_env(_origin)
        _wrap_model(check, model)
        try:
            result = original(model, *args, **kwargs)
        finally:
            _unwrap(model)
        check.coverage = reconcile(check.layers, model, vllm_adapter.load_format())
        object.__setattr__(model, CHECKED_MARK, True)
        if check.recorder is not None:
            check.recorder.flush(vllm_adapter.global_rank())
        finish(check, vllm_adapter.global_rank())
        check.compile_key = key_compile_cache(check)
        return result

    loader.process_weights_after_loading = process_weights_after_loading
    ledger.record(CHECK_PATCH)
