"""The seam to vLLM holds: outside `vllm_adapter/`, no module imports vLLM or reads the shape of
vLLM's objects (the attribute names vLLM gives its layers, quant methods and kernels).

A vLLM upgrade then means reading `vllm_adapter/`, whose contract tests
(`test_vllm_adapter*.py`, `test_e2e_vllm_adapter_layer.py`) say what changed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "server" / "gemmguard"
ADAPTER = PACKAGE / "vllm_adapter"

# Attribute names of vLLM's layers, quant methods, kernel configs and MoE kernels that the
# accessors in vllm_adapter/layer.py and vllm_adapter/moe.py own. None of them is a name
# gemmguard uses for its own objects.
VLLM_SHAPES = frozenset({
    "quant_method", "quant_config", "moe_kernel", "fused_experts", "fallback_experts",
    "experts_cls", "weight_quant_key", "activation_quant_key", "group_shape",
    "is_static_input_scheme", "cpu_linear", "_gemm_impl", "orig_dtype", "logical_widths",
    "input_size_per_partition", "intermediate_size_per_partition", "expert_map",
    "global_num_experts", "_get_layer_params", "weight_scale_inv",
    "w13_weight", "w2_weight", "kv_cache_dtype", "block_quant", "weight_block_size",
    "fp8_linear", "engine_core", "core_engines", "model_runner",
})


def _modules_outside_the_adapter() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if ADAPTER not in p.parents)


def _adapter_names(tree: ast.AST) -> set[str]:
    """Names bound to the adapter's modules (`from gemmguard.vllm_adapter import layer`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("gemmguard.vllm_adapter") or node.module == "gemmguard"):
            names |= {a.asname or a.name for a in node.names
                      if node.module != "gemmguard" or a.name == "vllm_adapter"}
    return names


def _names_read(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) for `x.name` and `getattr/hasattr/setattr(x, "name", …)`; calls into the
    adapter (`layer.quant_method(m)`) are the seam, not a read."""
    adapter = _adapter_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if not (isinstance(node.value, ast.Name) and node.value.id in adapter):
                found.append((node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            found.append((node.lineno, node.args[1].value))
    return found


def _vllm_imports(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name == "vllm" or a.name.startswith("vllm.") for a in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "vllm" or node.module.startswith("vllm.")):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", _modules_outside_the_adapter(),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_outside_the_adapter_imports_vllm_or_reads_its_object_shapes(
        path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    imports = _vllm_imports(tree)
    shapes = [f"line {line}: .{name}" for line, name in _names_read(tree) if name in VLLM_SHAPES]
    assert not imports, f"{path.name} imports vLLM at lines {imports}: go through vllm_adapter"
    assert not shapes, (f"{path.name} reads vLLM's object shapes directly ({', '.join(shapes)}); "
                        "add or use an accessor in vllm_adapter/layer.py")


def test_the_seam_check_sees_what_it_forbids() -> None:
    # The two detectors find the forms they are meant to (a check that cannot fail is no check).
    tree = ast.parse("import vllm.config\nfrom vllm import LLM\n"
                     "from gemmguard.vllm_adapter import layer\nlayer.quant_method(m)\n"
                     "m.quant_method.apply(m, x)\ngetattr(m, 'weight_scale_inv', None)\n")
    assert _vllm_imports(tree) == [1, 2]
    assert sorted((line, name) for line, name in _names_read(tree) if name in VLLM_SHAPES) == [
        (5, "quant_method"), (6, "weight_scale_inv")]
    adapter_layer = ast.parse((ADAPTER / "layer.py").read_text())
    assert {name for _, name in _names_read(adapter_layer)} & VLLM_SHAPES
