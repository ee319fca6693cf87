"""Fix 1: DeepGEMM stays off on Blackwell for the model types its E8M0 scales hurt."""

from __future__ import annotations

import copy
import types
from typing import Any

from gemmguard import ledger
from gemmguard.config import Settings
from gemmguard.fixes import Changes, Finding, Fix, FixNotPatchable, deepgemm_table, probe
from gemmguard.vllm_adapter import fixes as engine

NAME = "deepgemm-blackwell"
PRED = engine.EXCLUSION_PREDICATE
CONTROL_MODEL_TYPE = "llama"  # never excluded: the probe must accept it, or it proves nothing

TABLE_PATCH = ledger.Patch(
    name="deepgemm-exclusion-table",
    why="vLLM's table is code, cannot be overridden (VLLM_USE_DEEP_GEMM=1 does not bring "
    "DeepGEMM back for linear layers), and still warns 'Auto-disabled DeepGemm' when DeepGEMM "
    "is not installed.",
    how="Edit vllm.utils.deep_gemm._DEEPGEMM_BLACKWELL_EXCLUDED_MODEL_TYPES in place (its "
    "callers bind the predicate by name; the predicate reads the table at call time): add "
    "gemmguard's known-bad list, drop forced model types, empty it where DeepGEMM cannot run.",
    upstream="#37806 added the table; R1/R2 of its review are open in 0.33.",
    remove_when="vLLM honours an explicit DeepGEMM opt-in and checks DeepGEMM is usable.",
)
MOE_PATCH = ledger.Patch(
    name="deepgemm-moe-exclusion",
    why="vLLM 0.26/0.32's FP8 MoE oracle ignores the exclusion table and picks DeepGEMM for "
    "excluded models (upstream issue #50332).",
    how="Wrap fused_moe.oracle.fp8._get_priority_backends (looked up at call time) to drop "
    "DEEPGEMM and BATCHED_DEEPGEMM for excluded models unless VLLM_(MOE_)USE_DEEP_GEMM is set.",
    upstream="Fixed in 0.33 (oracle/fp8.py:497-503).",
    remove_when="The pinned vLLM is 0.33 or later.",
)


def _case() -> tuple[str, int]:
    """An excluded (model type, family) from the engine's own table, for the probes."""
    table = getattr(engine.deep_gemm_module(), engine.EXCLUSION_TABLE, None) or {}
    for model_type in table:
        families = table[model_type] if isinstance(table, dict) else (100,)
        if families:
            return model_type, families[0]
    return "qwen3_5_text", 100


def _pred(fn: Any, platform: Any, **overrides: Any) -> Any:
    return probe.simulated(fn, platform, **overrides)


def _linear_accepts(model_type: str, platform: Any, envs: Any = None) -> bool:
    kernel = engine.deep_gemm_linear_kernel()
    assert kernel is not None
    gate = kernel.can_implement
    overrides: dict[str, Any] = {
        "get_current_vllm_config": lambda: probe.stub_vllm_config(model_type),
        "should_use_deepgemm_for_fp8_linear": lambda *a, **k: True,  # DeepGEMM not installed
        "current_platform": platform,
    }
    bound = probe.module_globals(gate).get(PRED)
    if bound is not None:
        overrides[PRED] = _pred(bound, platform, **({"envs": envs} if envs else {}))
    if envs is not None:
        overrides["envs"] = envs
    return bool(probe.with_globals(gate, overrides)(engine.fp8_block_config())[0])


def _moe_choice(model_type: str, platform: Any) -> Any:
    oracle = engine.fp8_moe_oracle()
    backend = oracle.Fp8MoeBackend
    usable = {backend.DEEPGEMM, backend.TRITON}  # as the audit's fake-experts probe

    def kernel_cls(b: Any) -> list[type]:
        ok = b in usable
        return [type(f"Probe{b.value}", (), {"is_supported_config": staticmethod(
            lambda *a, ok=ok: (ok, None if ok else "probe"))})]

    select = oracle.select_fp8_moe_backend
    glob = select.__globals__
    overrides: dict[str, Any] = {
        "current_platform": platform, "envs": probe.StubEnvs(engine.envs(), explicit=False),
        "backend_to_kernel_cls": kernel_cls, "logger": probe.QuietLogger(),
        "get_current_vllm_config": lambda: probe.stub_vllm_config(model_type),
    }
    for name in (PRED, "_get_priority_backends"):
        if name in glob:
            overrides[name] = _pred(glob[name], platform)
    priority = glob.get("_get_priority_backends")
    if getattr(priority, "__gemmguard_fix__", None) == NAME:  # gemmguard's patch, in front
        excluded = _pred(getattr(engine.deep_gemm_module(), PRED), platform)(model_type)
        overrides["_get_priority_backends"] = probe.with_closure(
            probe.with_globals(priority, {"_drops_deep_gemm": lambda: excluded}),
            {"original": _pred(priority.__wrapped__, platform)})
    oracle_cls = glob.get("Fp8MoEKernelOracle")
    if isinstance(oracle_cls, type):
        # 0.34: the kernel classes come through an oracle object whose methods read their own
        # module's `backend_to_kernel_cls`: give the probe's classes to a subclass instead.
        overrides["Fp8MoEKernelOracle"] = type(
            "ProbeFp8MoEKernelOracle", (oracle_cls,),
            {"backend_to_kernel_cls": lambda self, b: kernel_cls(b)})
    parallel = types.SimpleNamespace(
        use_batched_activation_format=False, use_deepep_v2_kernels=False, ep_size=1
    )
    # Standard (not batched) activations, where each version asks: the parallel config
    # (≤ 0.33), the MoE config itself (0.34: `activation_format.is_batched`).
    moe_config = types.SimpleNamespace(
        moe_backend="auto", moe_parallel_config=parallel, use_batched_activation_format=False,
        activation_format=types.SimpleNamespace(is_batched=False))
    return probe.with_globals(select, overrides)(moe_config, *engine.fp8_moe_keys())[0]


def _parts() -> dict[str, str]:
    """Each part of the fix: "ok", "missing" or "unknown: why"."""
    dg = engine.deep_gemm_module()
    if not hasattr(dg, engine.EXCLUSION_TABLE) or not hasattr(dg, PRED):
        return {"table": "missing", "linear": "missing", "moe": "unknown: no table"}
    model_type, family = _case()
    blackwell = probe.StubPlatform("cuda", family)
    hopper = probe.StubPlatform("cuda", 90)
    pred = getattr(dg, PRED)
    parts = {"table": "ok" if _pred(pred, blackwell)(model_type) and not _pred(pred, hopper)(
        model_type) and not _pred(pred, blackwell)(CONTROL_MODEL_TYPE) else "missing"}
    if engine.deep_gemm_linear_kernel() is None:
        parts["linear"] = "ok"  # no DeepGEMM linear kernel to keep off
    elif not _linear_accepts(CONTROL_MODEL_TYPE, blackwell):
        parts["linear"] = "unknown: the probe rejects a model that is not excluded"
    else:
        parts["linear"] = "missing" if _linear_accepts(model_type, blackwell) else "ok"
        forced_env = probe.StubEnvs(engine.envs(), explicit=True, VLLM_USE_DEEP_GEMM=True)
        parts["opt_in"] = "ok" if _linear_accepts(model_type, blackwell, forced_env) else "missing"
    backend = engine.fp8_moe_oracle().Fp8MoeBackend
    if _moe_choice(CONTROL_MODEL_TYPE, blackwell) != backend.DEEPGEMM:
        parts["moe"] = "unknown: the probe does not reach DeepGEMM for a model not excluded"
    else:
        parts["moe"] = "missing" if _moe_choice(model_type, blackwell) == backend.DEEPGEMM else "ok"
    no_dg = probe.StubPlatform("cuda", family, deep_gemm=False)
    warns = _pred(pred, no_dg, has_deep_gemm=lambda: False, is_deep_gemm_supported=lambda: False)
    parts["no_warning_without_deepgemm"] = "missing" if warns(model_type) else "ok"
    return parts


def detect() -> Finding:
    """Probe the table, the linear and MoE gates, the opt-in and the not-installed warning."""
    parts = _parts()
    # A part the probe could not decide is listed with a "?" and is never patched blindly.
    missing = tuple(n if s == "missing" else f"{n}?" for n, s in parts.items() if s != "ok")
    form = type(getattr(engine.deep_gemm_module(), engine.EXCLUSION_TABLE, None)).__name__
    detail = f"table ({form}): " + ", ".join(f"{k} {v}" for k, v in parts.items())
    if not missing:
        return Finding("upstream", detail)
    undecided_only = all(p.endswith("?") for p in missing)
    return Finding("unknown" if undecided_only else "missing", detail, missing)


def _usable() -> bool:
    plat = engine.platform()
    return bool(plat.support_deep_gemm() and engine.envs().VLLM_USE_DEEP_GEMM
                and engine.has_deep_gemm())


def _enforceable(table: Any, entry: deepgemm_table.KnownBad) -> bool:
    """A set-form table is device-wide (the predicate hard-codes SM10x/SM12x): an entry for
    other families than this device's cannot be enforced with it."""
    if isinstance(table, dict):
        return True
    capability = engine.device_capability()
    family = None if capability is None else capability // 10 * 10
    return family in entry.families or (family is None and bool({100, 120} & {*entry.families}))


def _forced(settings: Settings) -> set[str]:
    forced = set(deepgemm_table.forced(settings))
    if engine.explicitly_set("VLLM_USE_DEEP_GEMM") and engine.envs().VLLM_USE_DEEP_GEMM:
        forced.add("*")  # as 0.33's MoE oracle reads an explicit VLLM_USE_DEEP_GEMM=1
    return forced


def _drops_deep_gemm() -> bool:
    """True when the model being built is excluded and no DeepGEMM choice was made explicitly."""
    # An explicit choice is the oracle's own (and it .remove()s DeepGEMM itself).
    if engine.explicitly_set("VLLM_USE_DEEP_GEMM") or engine.explicitly_set(
        "VLLM_MOE_USE_DEEP_GEMM"
    ):
        return False
    return bool(getattr(engine.deep_gemm_module(), PRED)(engine.current_model_type()))


def _wrap_moe_priority(changes: Changes) -> None:
    oracle = engine.fp8_moe_oracle()
    original = oracle._get_priority_backends
    if getattr(original, "__gemmguard_fix__", None) == NAME:
        return
    dropped = (oracle.Fp8MoeBackend.DEEPGEMM, oracle.Fp8MoeBackend.BATCHED_DEEPGEMM)

    def _get_priority_backends(*args: Any, **kwargs: Any) -> list[Any]:
        backends: list[Any] = original(*args, **kwargs)
        if _drops_deep_gemm():
            return [b for b in backends if b not in dropped]
        return backends

    # Function attributes on both lines (mypy types functions without attributes).
    _get_priority_backends.__gemmguard_fix__ = NAME  # type: ignore[attr-defined]
    _get_priority_backends.__wrapped__ = original  # type: ignore[attr-defined]
    changes.setattr(oracle, "_get_priority_backends", _get_priority_backends)
    changes.record(MOE_PATCH)


def patch(settings: Settings, finding: Finding, changes: Changes) -> str:
    """Extend, force and guard the table in place; cover MoE where the oracle does not.

    Everything that can refuse (no table, an undecided part, a bad setting) is checked before
    the first edit, and the new table is computed before it replaces the old contents.
    """
    table = getattr(engine.deep_gemm_module(), engine.EXCLUSION_TABLE, None)
    if table is None or {"table", "linear"} & set(finding.missing_parts):
        raise FixNotPatchable("this vLLM has no working exclusion table to extend")
    undecided = [p for p in finding.missing_parts if p.endswith("?")]
    if undecided:
        raise FixNotPatchable(f"{undecided} could not be probed, so vLLM was left unchanged")
    entries = deepgemm_table.known_bad(settings)
    forced = _forced(settings)
    new = copy.copy(table)
    skipped = []
    for entry in entries:
        if not _enforceable(new, entry):
            skipped.append(entry.model_type)
        elif isinstance(new, dict):
            new[entry.model_type] = tuple(sorted({*new.get(entry.model_type, ()),
                                                 *entry.families}))
        else:
            new.add(entry.model_type)
    done = [f"{len(new)} model types excluded"]
    if skipped:
        done.append(f"not enforceable on this device with a set-form table: {skipped}")
    removed = sorted(new) if "*" in forced else sorted(m for m in forced if m in new)
    for model_type in removed:
        if isinstance(new, dict):
            new.pop(model_type)
        else:
            new.discard(model_type)
    done.append(f"DeepGEMM forced on for {removed}" if removed else "opt-in ready")
    if not _usable():
        new.clear()
        done.append("DeepGEMM cannot run here, so the table is emptied (no auto-disable warning)")
    changes.keep_contents(table, f"{engine.EXCLUSION_TABLE}")
    table.clear()
    table.update(new)  # in place: callers bind the predicate, which reads this object
    changes.record(TABLE_PATCH)
    if "moe" in finding.missing_parts:
        _wrap_moe_priority(changes)
        done.append("MoE oracle now drops DeepGEMM for excluded models")
    return "; ".join(done)


def verify(settings: Settings) -> Finding:
    """The second probe: the behaviour the patch promised, under the settings it read."""
    dg = engine.deep_gemm_module()
    pred, table = getattr(dg, PRED), getattr(dg, engine.EXCLUSION_TABLE)
    entries = deepgemm_table.known_bad(settings)
    forced = _forced(settings)
    wrong: list[str] = []
    if not _usable():  # nothing may be excluded, so nothing warns about a missing DeepGEMM
        for entry in entries:
            for family in entry.families:
                no_dg = probe.StubPlatform("cuda", family, deep_gemm=False)
                if _pred(pred, no_dg, has_deep_gemm=lambda: False,
                         is_deep_gemm_supported=lambda: False)(entry.model_type):
                    wrong.append(f"{entry.model_type} still auto-disabled on SM{family // 10}x")
        detail = "; ".join(wrong) or "DeepGEMM cannot run here and no model type warns"
        return Finding("missing" if wrong else "upstream", detail, ("table",) if wrong else ())
    linear = engine.deep_gemm_linear_kernel() is not None
    backend = engine.fp8_moe_oracle().Fp8MoeBackend
    for entry in entries:
        if not _enforceable(table, entry):
            continue
        expect_excluded = "*" not in forced and entry.model_type not in forced
        platform = probe.StubPlatform("cuda", entry.families[0])
        if bool(_pred(pred, platform)(entry.model_type)) != expect_excluded:
            wrong.append(f"table: {entry.model_type} {'not ' if expect_excluded else ''}"
                         "excluded")
        if linear and _linear_accepts(entry.model_type, platform) == expect_excluded:
            wrong.append(f"linear: DeepGEMM {'takes' if expect_excluded else 'refuses'} "
                         f"{entry.model_type}")
        moe = _moe_choice(entry.model_type, platform) == backend.DEEPGEMM
        if expect_excluded and moe:
            wrong.append(f"moe: DeepGEMM chosen for {entry.model_type}")
    detail = "; ".join(wrong) or (f"{len(entries)} known-bad model types probed on their "
                                  f"families; forced: {sorted(forced) or 'none'}")
    return Finding("missing" if wrong else "upstream", detail, ("table",) if wrong else ())


FIX = Fix(
    name=NAME,
    title="DeepGEMM off on Blackwell for model types its E8M0 scales hurt",
    consequence="Excluded models (e.g. Qwen3.5 FP8) run DeepGEMM on Blackwell and lose accuracy "
    "(GSM8K 0.81 -> 0.69), or the engine warns about a DeepGEMM that is not installed.",
    remedy="Set VLLM_USE_DEEP_GEMM=0 for the affected models, or use vLLM 0.33.",
    hardware="CUDA GPUs (the table acts on Blackwell, SM10x/SM12x)",
    applies=lambda: bool(engine.platform().is_cuda()),
    detect=detect,
    patch=patch,
    verify=verify,
)
