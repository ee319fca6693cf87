"""Run vLLM's own code under a stand-in platform or stand-in helpers, without changing vLLM.

A fix is detected by what the installed engine does, not by its version number. Most fixes
concern hardware this process may not have (Blackwell, gfx950), so a probe calls the
engine's function with a *copy* of its module globals in which a few names (the platform,
a CUDA-only helper, an import) are replaced. The function's code, closures and defaults are
the engine's own; nothing in vLLM is modified, so probes are safe in a serving process.
"""

from __future__ import annotations

import ast
import builtins
import dis
import inspect
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch


def with_globals(
    fn: Any, overrides: Mapping[str, Any], imports: Mapping[str, Any] | None = None
) -> Any:
    """`fn` with some module globals (and `import` statements inside it) replaced."""
    if inspect.ismethod(fn):  # bound or class method: clone the function, bind it again
        return types.MethodType(with_globals(fn.__func__, overrides, imports), fn.__self__)
    if not isinstance(fn, types.FunctionType):
        return fn  # a builtin or a stub: nothing to clone
    new_globals = dict(fn.__globals__)
    new_globals.update(overrides)
    if imports:
        new_globals["__builtins__"] = _builtins_with_imports(imports)
    clone = types.FunctionType(
        fn.__code__, new_globals, fn.__name__, fn.__defaults__, fn.__closure__
    )
    clone.__kwdefaults__ = fn.__kwdefaults__
    return clone


def module_globals(fn: Any) -> dict[str, Any]:
    """The module globals a function, or the function under a bound or class method, reads."""
    target = fn.__func__ if inspect.ismethod(fn) else fn
    found: dict[str, Any] = target.__globals__
    return found


def with_closure(fn: Any, cells: Mapping[str, Any]) -> Any:
    """`fn` with some variables it closes over replaced (e.g. the function a wrapper wraps)."""
    if not isinstance(fn, types.FunctionType):
        return fn
    names = fn.__code__.co_freevars
    unknown = set(cells) - set(names)
    if unknown:
        raise ValueError(f"{fn.__qualname__} closes over {list(names)}, not {sorted(unknown)}")
    closure = tuple(types.CellType(cells[name]) if name in cells else cell
                    for name, cell in zip(names, fn.__closure__ or (), strict=True))
    clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    clone.__kwdefaults__ = fn.__kwdefaults__
    return clone


class _Synchronized(Exception):
    """Raised by the probe's stand-in for a device synchronize."""


def synchronizes_first(fn: Any) -> bool:
    """True if calling `fn` synchronizes the device before it reaches anything else.

    `fn` runs with stand-ins: `torch.accelerator`/`torch.cuda` whose `synchronize` stops the
    call, and every function it closes over replaced by one that fails; no device is touched.
    """
    def synchronize(*args: Any, **kwargs: Any) -> None:
        raise _Synchronized

    def reached(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("reached before any synchronize")

    device = types.SimpleNamespace(synchronize=synchronize)
    clone = with_globals(fn, {"torch": types.SimpleNamespace(accelerator=device, cuda=device)})
    if not isinstance(clone, types.FunctionType):
        return False  # a builtin or a torch op: no Python code that could synchronize first
    clone = with_closure(clone, dict.fromkeys(clone.__code__.co_freevars, reached))
    try:
        clone()  # no arguments: a function that needs them fails before its first line
    except _Synchronized:
        return True
    except Exception:
        return False
    return False


def _builtins_with_imports(imports: Mapping[str, Any]) -> dict[str, Any]:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        # `from a.b import c` asks for "a.b" and reads c from the result.
        if name in imports:
            return imports[name]
        return real_import(name, *args, **kwargs)

    return {**builtins.__dict__, "__import__": fake_import}


def simulated(fn: Any, platform: Any, **overrides: Any) -> Any:
    """`fn` reading `platform` wherever its module reads vLLM's `current_platform`."""
    return with_globals(fn, {"current_platform": platform, **overrides})


@dataclass(frozen=True)
class StubPlatform:
    """A stand-in for vLLM's `current_platform`: a CUDA or ROCm device of one capability."""

    kind: str  # "cuda" or "rocm"
    capability: int  # <major><minor>, e.g. 100 for sm_100
    deep_gemm: bool = True

    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def is_rocm(self) -> bool:
        return self.kind == "rocm"

    def is_cuda_alike(self) -> bool:
        return True

    def is_cpu(self) -> bool:
        return False

    def is_xpu(self) -> bool:
        return False

    def is_device_capability_family(self, capability: int, device_id: int = 0) -> bool:
        return self.capability // 10 == capability // 10

    def is_device_capability(self, capability: int | tuple[int, int], device_id: int = 0) -> bool:
        return self.capability == _as_int(capability)

    def has_device_capability(self, capability: int | tuple[int, int], device_id: int = 0) -> bool:
        return self.capability >= _as_int(capability)

    def support_deep_gemm(self) -> bool:
        return self.deep_gemm

    def fp8_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn


def _as_int(capability: int | tuple[int, int]) -> int:
    if isinstance(capability, tuple):
        return capability[0] * 10 + capability[1]
    return capability


def stub_vllm_config(model_type: str | None) -> Any:
    """The slice of a VllmConfig that kernel and oracle gates read: the model type."""
    hf = types.SimpleNamespace(model_type=model_type)
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_text_config=hf, hf_config=hf),
        quant_config=None,
    )


class StubEnvs:
    """`vllm.envs` with a few values replaced; `is_set` answers for exactly those when explicit."""

    def __init__(self, real: Any, explicit: bool, **values: Any) -> None:
        self._real, self._explicit, self._values = real, explicit, values

    def is_set(self, name: str) -> bool:
        return self._explicit and name in self._values

    def __getattr__(self, name: str) -> Any:
        return self._values[name] if name in self._values else getattr(self._real, name)


class QuietLogger:
    """Swallows the log lines an engine function writes while it is being probed."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it is on CUDA, to pass `assert t.is_cuda` in shape-only code."""

    @property
    # torch's stubs declare Tensor.is_cuda a plain attribute; a read-only property stands in.
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def names_in_order(fn: Any) -> Iterator[list[str]]:
    """Names each code object of `fn` (and its nested functions) loads, in bytecode order."""
    code = getattr(fn, "__code__", None) or fn.__func__.__code__
    stack = [code]
    while stack:
        current = stack.pop()
        names: list[str] = []
        for ins in dis.get_instructions(current):
            if not ins.opname.startswith("LOAD_") or ins.opname == "LOAD_CONST":
                continue  # constants are data (docstrings, import lists), not calls
            if isinstance(ins.argval, str):
                names.append(ins.argval)
            elif isinstance(ins.argval, tuple):  # LOAD_FAST_LOAD_FAST (3.13+)
                names.extend(v for v in ins.argval if isinstance(v, str))
        yield names
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))


def functions_calling(
    source: str, callee: str
) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Functions in `source` that call `callee` by name."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == callee
            for call in ast.walk(node)
        ):
            yield node
