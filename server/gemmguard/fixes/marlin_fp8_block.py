"""Fix 5: Marlin among the FP8 block-scaled candidates on CUDA, constructed as its base needs."""

from __future__ import annotations

from typing import Any

from gemmguard.fixes import Finding, Fix, probe
from gemmguard.vllm_adapter import fixes as engine

NAME = "marlin-fp8-block"
AMPERE = probe.StubPlatform("cuda", 80, deep_gemm=False)


def candidate_ok() -> tuple[bool, str]:
    """Marlin is a CUDA FP8 block candidate that accepts block configs on a simulated Ampere."""
    marlin = engine.marlin_fp8_kernel()
    names = [k.__name__ for k in engine.fp8_block_candidates("CUDA")]
    if marlin.__name__ not in names:
        return False, f"Marlin is not among the CUDA FP8 block candidates {names}"
    glob = probe.module_globals(marlin.is_supported)
    overrides = {}
    if "is_fp8_marlin_supported" in glob:
        check = glob["is_fp8_marlin_supported"]
        overrides["is_fp8_marlin_supported"] = probe.simulated(check, AMPERE)
    supported, reason = probe.simulated(marlin.is_supported, AMPERE, **overrides)(80)
    if not supported:
        return False, f"Marlin turns Ampere down: {reason}"
    accepted, reason = marlin.can_implement(engine.fp8_block_config())
    if not accepted:
        return False, f"Marlin turns FP8 block configs down: {reason}"
    position = names.index(marlin.__name__) + 1
    return True, f"Marlin is CUDA FP8 block candidate {position} of {len(names)}"


def _probe_kernels() -> dict[str, type]:
    """Kernels that record how they were constructed: a Marlin subclass and a block kernel."""
    marlin = engine.marlin_fp8_kernel()
    block_base: Any = engine.fp8_block_kernel_base()

    def record_scaled(self: Any, c: Any, layer_param_names: Any) -> None:
        self.config, self.layer_param_names = c, layer_param_names

    def record_block(self: Any, c: Any) -> None:
        self.config, self.layer_param_names = c, None

    block = type("ProbeBlock", (block_base,), {"__init__": record_block})
    # Constructed only, never run. typeshed's `type` lacks __abstractmethods__, which ABCMeta reads.
    block.__abstractmethods__ = frozenset()  # type: ignore[attr-defined]
    return {
        "a Marlin subclass": type("ProbeMarlin", (marlin,), {"__init__": record_scaled}),
        "a block-scaled kernel": block,
    }


def constructor_ok() -> tuple[bool, str]:
    """Behaviour: vLLM's FP8 kernel factory builds each kind of kernel with the right arguments."""
    init = engine.init_fp8_linear_kernel()
    weight_key, activation_key = engine.fp8_moe_keys()
    config = engine.fp8_block_config()
    for what, kernel in _probe_kernels().items():
        chooser = {"choose_scaled_mm_linear_kernel": lambda *a, k=kernel, **kw: k}
        factory = probe.with_globals(init, chooser)
        try:
            built = factory(activation_key, weight_key, config.input_dtype, config.out_dtype,
                            config.weight_shape)
        except TypeError as exc:
            return False, f"building {what} fails: {exc}"
        scaled = issubclass(kernel, engine.fp8_scaled_mm_kernel_base())
        if scaled and not built.layer_param_names:
            return False, f"{what} is built without its layer parameter names"
    return True, "constructed by base class (issubclass)"


def detect() -> Finding:
    """The candidate list and Marlin's gates under a simulated Ampere; the factory by behaviour."""
    parts = {"candidate": candidate_ok(), "constructor": constructor_ok()}
    missing = tuple(name for name, (ok, _) in parts.items() if not ok)
    detail = "; ".join(text for _, text in parts.values())
    return Finding("missing" if missing else "upstream", detail, missing)


def _applies() -> bool:
    capability = engine.device_capability()
    # Hopper and newer have CUTLASS/DeepGEMM block FP8; Marlin is the fallback below them.
    return bool(engine.platform().is_cuda()) and capability is not None and capability < 90


FIX = Fix(
    name=NAME,
    title="Ampere: Marlin among the FP8 block-scaled kernels, built for its base class",
    consequence="FP8 block-scaled checkpoints fail to load on GPUs without CUTLASS block FP8 "
    "(Ampere, Ada) unless gemmguard's portable kernel takes over (slower).",
    remedy="Use a vLLM with seed fix 004 (0.26+); gemmguard's portable FP8 kernel still loads "
    "the checkpoint meanwhile (see fix portable-fp8).",
    hardware="CUDA GPUs below sm_90 (Ampere, Ada)",
    applies=_applies,
    detect=detect,
    patch=None,  # the portable FP8 kernel (fix 6) is the fallback where Marlin is missing
)
