"""Fix 4: DeepSeek sparse-attention indexer: FP8 `wk` upcast to BF16, paired in any order."""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import inspect
import sys
import types
from typing import Any

import torch

from gemmguard import ledger
from gemmguard.config import Settings
from gemmguard.fixes import Changes, Finding, Fix, FixNotPatchable, probe
from gemmguard.vllm_adapter import fixes as engine

NAME = "deepseek-indexer-wk"
LOADER = engine.INDEXER_WK_LOADER
_PENDING_ATTR = "_gemmguard_pending_wk_fp8"  # on the fused parameter: lives as long as the model
_PREFIX = "model.layers.0.self_attn.indexer"

PAIRING_PATCH = ledger.Patch(
    name="indexer-wk-pairing-across-calls",
    why="Reordering loaders (e.g. runai_streamer) can split an FP8 indexer wk weight/scale pair "
    "across load_weights() calls; a per-call buffer then drops the half that came first.",
    how="Wrap every module's _try_load_fp8_indexer_wk (patched on import, rebound where imported "
    "by name) to keep the pending half on the fused wk_weights_proj parameter, not in the "
    "caller's buffer.",
    upstream="0.33 keeps the buffer on the model for DeepSeek V2/V3.2/MTP; 0.32 only for V2; "
    "glm5next and hy_v4 use a per-call buffer in both.",
    remove_when="Every caller keeps its buffer across load_weights() calls.",
)


def upcast_ok() -> tuple[bool, str]:
    """Behaviour: feed an FP8 wk and its block scale, in both orders, to vLLM's loader."""
    loader = getattr(engine.deepseek_v2(), LOADER, None)
    if loader is None:
        return False, "no FP8 indexer-wk loader: wk stays FP8 and unfused"
    weight = (torch.arange(256 * 128, dtype=torch.float32).reshape(256, 128) % 7 - 3)
    scale = torch.tensor([[0.5], [2.0]])
    expected = (weight * scale.repeat_interleave(128, dim=0)).to(torch.bfloat16)
    extra = _extra_args(loader)
    for order in (("weight", "weight_scale_inv"), ("weight_scale_inv", "weight")):
        loaded: list[torch.Tensor] = []
        param = types.SimpleNamespace(weight_loader=lambda p, w, shard, out=loaded: out.append(w))
        params = {f"{_PREFIX}.wk_weights_proj.weight": param}
        buf: dict[str, Any] = {}
        for part in order:
            tensor = weight.to(torch.float8_e4m3fn) if part == "weight" else scale
            loader(f"{_PREFIX}.wk.{part}", tensor, buf, params, set(), *extra)
        if not loaded or loaded[0].dtype != torch.bfloat16 or not torch.equal(loaded[0], expected):
            return False, f"FP8 wk not loaded as its BF16 dequantization ({' then '.join(order)})"
    return True, "FP8 wk upcast to BF16, either order"


def _extra_args(loader: Any) -> list[Any]:
    try:  # 0.32+ take pp_missing_layer_names as a sixth argument
        inspect.signature(loader).bind(*range(6))
    except TypeError:
        return []
    return [set()]


def _loads_split_pair(loader: Any) -> bool:
    """Behaviour: an FP8 wk and its scale in two calls, each with a fresh buffer, load once."""
    loaded: list[torch.Tensor] = []
    param = types.SimpleNamespace(weight_loader=lambda p, w, shard: loaded.append(w))
    params = {f"{_PREFIX}.wk_weights_proj.weight": param}
    weight = torch.full((256, 128), 2.0).to(torch.float8_e4m3fn)
    for part in ("weight", "weight_scale_inv"):
        tensor = weight if part == "weight" else torch.tensor([[0.25], [4.0]])
        loader(f"{_PREFIX}.wk.{part}", tensor, {}, params, set(), *_extra_args(loader))
    return len(loaded) == 1 and loaded[0].dtype == torch.bfloat16


def _per_call(fn: ast.FunctionDef | ast.AsyncFunctionDef, call: ast.Call) -> bool:
    """True if the buffer passed to the loader is a fresh `{}` made in this function."""
    arg = call.args[2] if len(call.args) > 2 else None
    if not isinstance(arg, ast.Name):
        return False  # e.g. self._pending: kept across calls
    values = [node.value for node in ast.walk(fn)
              if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
              and any(isinstance(t, ast.Name) and t.id == arg.id
                      for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    return bool(values) and all(isinstance(v, ast.Dict) for v in values)


def per_call_callers() -> list[str]:
    """Callers whose buffer lives for one load_weights() call (read from source)."""
    return [f"{module_name.removeprefix('vllm.')}:{fn}"
            for module_name, fns in _per_call_modules().items() for fn in fns]


def _per_call_modules() -> dict[str, list[str]]:
    """{module: its functions that call the loader with a per-call buffer} (read from source)."""
    found: dict[str, list[str]] = {}
    for module_name, path in engine.model_sources():
        for fn in probe.functions_calling(path.read_text(errors="replace"), LOADER):
            calls = [c for c in ast.walk(fn) if isinstance(c, ast.Call)
                     and isinstance(c.func, ast.Name) and c.func.id == LOADER]
            if any(_per_call(fn, c) for c in calls):
                found.setdefault(module_name, []).append(fn.name)
    return found


def pairing_ok() -> tuple[bool, str]:
    """Behaviour, after the patch: each per-call caller's loader keeps a pair split in two.

    A caller's module that is not imported yet cannot be probed without importing it; there
    the import hook that wraps it on import must be installed.
    """
    definers = _definers()
    imported = sorted((definers | set(_per_call_modules())) & set(sys.modules))
    lost = [m for m in imported
            if not _loads_split_pair(getattr(sys.modules[m], LOADER, None) or _no_loader)]
    if lost:
        return False, f"a pair split across load_weights() calls is still lost in {lost}"
    later = definers - set(sys.modules)  # callers imported later bind a definer's loader
    hooked = set().union(*(f.targets for f in sys.meta_path if isinstance(f, _WrapOnImport)))
    if later - hooked:
        return False, f"{sorted(later - hooked)} would not be wrapped when imported"
    return True, (f"pairs kept across load_weights() calls ({len(imported)} loaded modules "
                  f"probed, {len(later)} wrapped on import)")


def _definers() -> set[str]:
    """The vLLM model modules that define the loader (read from source)."""
    return {name for name, path in engine.model_sources()
            if f"def {LOADER}(" in path.read_text(errors="replace")}


def _no_loader(*args: Any) -> None:
    """Stands in for a module that lost its loader: loads nothing."""


def verify(settings: Settings) -> Finding:
    """The second probe after the patch: the upcast, and pairs split across calls."""
    for ok, text in (upcast_ok(), pairing_ok()):
        if not ok:
            return Finding("missing", text, ("pairing",))
    return Finding("upstream", text)


def detect() -> Finding:
    """Upcast by behaviour; buffer lifetime from the callers' source (a loader needs a model)."""
    ok, text = upcast_ok()
    if not ok:
        return Finding("missing", text, ("upcast",))
    per_call = per_call_callers()
    if per_call:
        return Finding("missing", f"{text}; a weight/scale pair split across load_weights() "
                       f"calls is lost in {len(per_call)} loaders (read from source): "
                       + ", ".join(per_call), ("pairing",))
    return Finding("upstream", f"{text}; pairs kept across load_weights() calls")


def _persistent(original: Any) -> Any:
    def loader(name: str, tensor: torch.Tensor, buf: dict[str, Any], params_dict: Any,
               *rest: Any, **kwargs: Any) -> Any:
        if "indexer.wk." in name and "wk_weights" not in name:
            target = params_dict.get(f"{name.rsplit('.wk.', 1)[0]}.wk_weights_proj.weight")
            if target is not None:
                if not hasattr(target, _PENDING_ATTR):
                    setattr(target, _PENDING_ATTR, {})
                buf = getattr(target, _PENDING_ATTR)
        return original(name, tensor, buf, params_dict, *rest, **kwargs)

    loader.__gemmguard_fix__ = NAME  # type: ignore[attr-defined]  # a function attribute
    loader.__wrapped__ = original  # type: ignore[attr-defined]  # a function attribute
    return loader


def _wrap_module(module: types.ModuleType, changes: Changes | None = None) -> None:
    """Wrap `module`'s loader and rebind it where imported by name (through `changes` if any).

    Without `changes` (the import hook, for a module imported after the patch) the edit is
    not undoable, and needs not be: the hook is removed with the rest of an undone patch.
    """
    set_attr = changes.setattr if changes is not None else setattr
    original = getattr(module, LOADER, None)
    if original is None or getattr(original, "__gemmguard_fix__", None) == NAME:
        return
    wrapped = _persistent(original)
    set_attr(module, LOADER, wrapped)
    for name, other in list(sys.modules.items()):  # vLLM modules that imported it by name
        # vars(), not getattr(): lazy modules (transformers) import things on attribute access.
        if name.startswith("vllm.") and vars(other).get(LOADER) is original:
            set_attr(other, LOADER, wrapped)


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Wraps the loader in a model module as soon as that module is imported."""

    def __init__(self, targets: frozenset[str]) -> None:
        self.targets = targets

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.targets:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module: types.ModuleType) -> None:
            exec_module(module)
            _wrap_module(module)

        # Replaces the method on this one loader instance, which mypy disallows for methods.
        spec.loader.exec_module = exec_and_wrap  # type: ignore[method-assign]
        return spec


def patch(settings: Settings, finding: Finding, changes: Changes) -> str:
    """Keep a pending wk half on its fused parameter, in every module defining the loader."""
    if "pairing" not in finding.missing_parts:
        raise FixNotPatchable("the FP8 wk upcast itself is missing and is not patchable")
    definers = _definers()
    if not any(isinstance(f, _WrapOnImport) for f in sys.meta_path):
        hook = _WrapOnImport(frozenset(definers - set(sys.modules)))
        changes.call("sys.meta_path", lambda: sys.meta_path.insert(0, hook),
                     lambda: sys.meta_path.remove(hook))
    for name in definers & set(sys.modules):
        _wrap_module(sys.modules[name], changes)
    changes.record(PAIRING_PATCH)
    return f"pending halves kept on the fused parameter ({len(definers)} loader definitions)"


FIX = Fix(
    name=NAME,
    title="DeepSeek indexer: FP8 wk upcast to BF16; weight/scale paired in any order",
    consequence="With a reordering loader (e.g. --load-format runai_streamer), an FP8 DSA "
    "checkpoint's indexer wk can be left unloaded, silently degrading sparse attention.",
    remedy="Do not use reordering loaders (--load-format runai_streamer) with FP8 DSA checkpoints.",
    hardware="CUDA and ROCm GPUs (DeepSeek sparse attention)",
    applies=lambda: bool(engine.platform().is_cuda() or engine.platform().is_rocm()),
    detect=detect,
    patch=patch,
    verify=verify,
)
