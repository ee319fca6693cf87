"""How each quantization scheme stores weights in a checkpoint, and how it quantizes activations.

The self-check reads a layer's parameters *as loaded from the checkpoint*, before vLLM
post-processes them for a kernel, and turns sampled rows into fp32 values here. One format
per scheme family; a layer whose scheme has no format here is `unchecked`, never passed.

A linear format answers: how many output rows, the fp32 values of some rows, which rows sit
in the blocks (or groups) with the smallest and largest scales, and how activations are
quantized. An MoE format answers the same per expert for the fused `w13` (gate and up, in
that order) and `w2` (down) weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gemmguard.vllm_adapter import layer


class Unchecked(Exception):  # noqa: N818 - a verdict, raised to leave a layer unchecked
    """The layer cannot be checked; the message is the one-line reason in the report."""


@dataclass(frozen=True)
class Activation:
    """How the scheme quantizes activations before the GEMM.

    kind: none, group (1×size), token, tensor or static; fmt: the number format of the
    quantized activations: fp8, int8, or one `numerics.fake_quantize_activation` knows
    (mxfp4-ceil, mxfp4-even, mxfp8-ceil, mxfp8-even: 1×32 E8M0 blocks by scale rule; nvfp4:
    1×16 e4m3 blocks, with `static_scale` the global divisor G of block scale e4m3(G·amax/6)).
    """

    kind: str
    size: int = 0
    static_scale: float = 0.0
    fmt: str = "fp8"


NO_ACTIVATION_QUANT = Activation("none")


class LinearFormat(Protocol):
    def n_rows(self, module: Any) -> int: ...

    def rows(self, module: Any, rows: torch.Tensor) -> torch.Tensor:
        """fp32 (len(rows), K): the checkpoint's values of these output rows."""

    def extreme_rows(self, module: Any) -> list[int]:
        """Output rows inside the blocks or groups with the smallest and largest scales."""

    def activation(self, module: Any, kernel: Any) -> Activation: ...


class ExpertRows(Protocol):
    """One expert's packed weights, read row by row in fp32."""

    @property
    def n_rows(self) -> int: ...

    def rows(self, rows: torch.Tensor) -> torch.Tensor: ...


class RowsPerExpert:
    """`w13` and `w2_rows` of an MoE format whose `tensors` gives one expert's `ExpertRows`."""

    def tensors(self, module: Any, which: str, expert: int) -> ExpertRows:
        raise NotImplementedError

    def w13(self, module: Any, expert: int) -> torch.Tensor:
        tensors = self.tensors(module, "w13", expert)
        return tensors.rows(torch.arange(tensors.n_rows))

    def w2_rows(self, module: Any, expert: int, rows: torch.Tensor) -> torch.Tensor:
        return self.tensors(module, "w2", expert).rows(rows)


class MoeFormat(Protocol):
    def w13(self, module: Any, expert: int) -> torch.Tensor:
        """fp32 (2I, H) of one local expert: gate rows then up rows."""

    def w2_rows(self, module: Any, expert: int, rows: torch.Tensor) -> torch.Tensor:
        """fp32 (len(rows), I) of one local expert's down projection."""

    def expert_magnitude(self, module: Any) -> torch.Tensor:
        """One number per local expert that orders them by weight scale (smallest first)."""

    def activation(self, module: Any) -> Activation: ...


# --- shared arithmetic -------------------------------------------------------------------------


def expand_blocks(scale: torch.Tensor, block: tuple[int, int], cols: int) -> torch.Tensor:
    """(rows, K-blocks) block scales of some rows → (rows, cols) per-element scales."""
    return scale.float().repeat_interleave(block[1], dim=-1)[..., :cols]


def rows_of_extremes(per_row: torch.Tensor) -> list[int]:
    """The rows holding the smallest and largest of a per-row magnitude."""
    finite = torch.where(torch.isfinite(per_row), per_row, torch.zeros_like(per_row))
    return sorted({int(finite.argmin()), int(finite.argmax())})


def mismatch(what: str) -> Unchecked:
    """The verdict for checkpoint tensors that do not fit the scheme the layer declares."""
    return Unchecked(f"weights do not match the declared scheme: {what}")


def required_tensor(module: Any, *names: str) -> torch.Tensor:
    """The first of `names` the layer holds; a mismatch naming them when it holds none."""
    value = layer.tensor(module, *names)
    if value is None:
        raise mismatch(f"no {' or '.join(names)}")
    return value


def _per_shard_rows(module: Any, scale: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row scales of a per-tensor scheme: one scale per logical shard (q/k/v, gate/up)."""
    flat = scale.detach().float().reshape(-1).cpu()
    if flat.numel() == n_rows:
        return flat
    widths = layer.logical_widths(module) or [n_rows]
    if sum(widths) != n_rows or flat.numel() not in (1, len(widths)):
        raise Unchecked(f"weights do not match the declared scheme: {flat.numel()} scales "
                        f"for {len(widths)} shards of {n_rows} rows")
    shard = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
    return flat[shard.clamp(max=flat.numel() - 1)]


# --- unquantized -------------------------------------------------------------------------------


class Unquantized:
    """bf16/fp16/fp32 weights: the checkpoint values are the weights."""

    def n_rows(self, module: Any) -> int:
        return int(required_tensor(module, "weight").shape[0])

    def rows(self, module: Any, rows: torch.Tensor) -> torch.Tensor:
        weight = required_tensor(module, "weight")
        return weight.detach()[rows.to(weight.device)].float().cpu()

    def extreme_rows(self, module: Any) -> list[int]:
        return []

    def activation(self, module: Any, kernel: Any) -> Activation:
        return NO_ACTIVATION_QUANT


# --- fp8 and int8 (scaled-mm kernels) ------------------------------------------------------------


def _static_scale(module: Any) -> float:
    scale = layer.tensor(module, "input_scale")
    return float(scale.detach().float().max()) if scale is not None else 1.0


def _activation_of_kernel(kernel: Any, module: Any, fmt: str) -> Activation:
    if layer.marlin_weight_only(kernel):
        # The scheme quantizes activations; weight-only Marlin does not (docs/kernel-arithmetic.md):
        # its ideal is A16, bf16(q·s) weights at the MMA. Measured on an H100 (vLLM 0.26): with
        # the scheme's FP8 activations in the ideal, Marlin read 2.8 bit *better* than ideal.
        return NO_ACTIVATION_QUANT
    key = layer.quant_key(layer.activation_quant_key(kernel))
    if key is None:
        # int8 configs carry flags instead of a key.
        static = layer.int8_static_input(kernel)
        if static:
            return Activation("static", static_scale=_static_scale(module), fmt=fmt)
        return Activation("token", fmt=fmt) if static is not None else NO_ACTIVATION_QUANT
    if key.static:
        return Activation("static", static_scale=_static_scale(module), fmt=fmt)
    row, col = key.group or (0, 0)
    if col > 1:
        return Activation("group", size=col, fmt=fmt)
    return Activation("token" if row == 1 else "tensor", fmt=fmt)


class ScaledFormat:
    """fp8 or int8 weights with per-tensor, per-channel or 2-D block scales."""

    def __init__(self, fmt: str, block: tuple[int, int] | None) -> None:
        self.fmt = fmt
        self.block = block

    def n_rows(self, module: Any) -> int:
        return int(required_tensor(module, "weight").shape[0])

    def _scale(self, module: Any) -> torch.Tensor:
        return required_tensor(module, "weight_scale_inv", "weight_scale").detach().float().cpu()

    def _row_scales(self, module: Any) -> torch.Tensor:
        """(n_rows, K-blocks) for block scales, (n_rows, 1) otherwise."""
        n_rows = self.n_rows(module)
        scale = self._scale(module)
        if self.block is not None:
            return scale.repeat_interleave(self.block[0], dim=0)[:n_rows]
        return _per_shard_rows(module, scale, n_rows).reshape(n_rows, 1)

    def rows(self, module: Any, rows: torch.Tensor) -> torch.Tensor:
        weight = required_tensor(module, "weight")
        if weight.dtype.is_floating_point and weight.element_size() > 1:
            raise Unchecked("weights do not match the declared scheme: "
                            f"{self.fmt} scheme but the checkpoint holds {weight.dtype}")
        values = weight.detach()[rows.to(weight.device)].float().cpu()
        scale = self._row_scales(module)[rows]
        if self.block is not None:
            return values * expand_blocks(scale, self.block, values.shape[1])
        return values * scale

    def extreme_rows(self, module: Any) -> list[int]:
        scale = self._row_scales(module)
        return rows_of_extremes(scale.amax(dim=1)) + rows_of_extremes(scale.amin(dim=1))

    def activation(self, module: Any, kernel: Any) -> Activation:
        return _activation_of_kernel(kernel, module, self.fmt)


# --- MoE ----------------------------------------------------------------------------------------


class MoeUnquantized:
    """bf16/fp16 experts."""

    def w13(self, module: Any, expert: int) -> torch.Tensor:
        return required_tensor(module, "w13_weight").detach()[expert].float().cpu()

    def w2_rows(self, module: Any, expert: int, rows: torch.Tensor) -> torch.Tensor:
        w2 = required_tensor(module, "w2_weight").detach()[expert]
        return w2[rows.to(w2.device)].float().cpu()

    def expert_magnitude(self, module: Any) -> torch.Tensor:
        w13 = required_tensor(module, "w13_weight").detach()
        return w13.float().abs().amax(dim=(1, 2)).cpu()

    def activation(self, module: Any) -> Activation:
        return NO_ACTIVATION_QUANT


class MoeFp8:
    """fp8 experts with block (`*_weight_scale_inv`) or per-tensor/channel (`*_weight_scale`)."""

    def __init__(self, block: tuple[int, int] | None, activation: Activation) -> None:
        self.block = block
        self._activation = activation

    def _expert(self, module: Any, which: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = required_tensor(module, f"{which}_weight").detach()[expert]
        scale = required_tensor(module, f"{which}_weight_scale_inv", f"{which}_weight_scale")
        return weight, scale.detach()[expert].float().cpu()

    def _dequantize(self, weight: torch.Tensor, scale: torch.Tensor,
                    rows: torch.Tensor | None, widths: int = 1) -> torch.Tensor:
        n_rows = weight.shape[0]
        rows = torch.arange(n_rows) if rows is None else rows
        values = weight[rows.to(weight.device)].float().cpu()
        if self.block is not None:
            per_row = scale.repeat_interleave(self.block[0], dim=0)[:n_rows][rows]
            return values * expand_blocks(per_row, self.block, values.shape[1])
        flat = scale.reshape(-1)
        if flat.numel() == n_rows:
            return values * flat[rows].reshape(-1, 1)
        # Per-tensor: one scale per shard (w13: gate and up).
        shard = (rows * flat.numel()) // n_rows if flat.numel() == widths else rows * 0
        return values * flat[shard.clamp(max=flat.numel() - 1)].reshape(-1, 1)

    def w13(self, module: Any, expert: int) -> torch.Tensor:
        weight, scale = self._expert(module, "w13", expert)
        return self._dequantize(weight, scale, None, widths=2)

    def w2_rows(self, module: Any, expert: int, rows: torch.Tensor) -> torch.Tensor:
        weight, scale = self._expert(module, "w2", expert)
        return self._dequantize(weight, scale, rows)

    def expert_magnitude(self, module: Any) -> torch.Tensor:
        scale = required_tensor(module, "w13_weight_scale_inv", "w13_weight_scale").detach().float()
        return scale.reshape(scale.shape[0], -1).amax(dim=1).cpu()

    def activation(self, module: Any) -> Activation:
        return self._activation


# --- which format a layer has --------------------------------------------------------------------


def _block_of(kernel: Any) -> tuple[int, int] | None:
    group = layer.group_shape(layer.weight_quant_key(kernel))
    if group is None:
        return None
    row, col = group
    return (row, col) if row > 1 and col > 1 else None


def linear_format(scheme: str, kernel: Any) -> LinearFormat:
    """The format of a linear layer's checkpoint weights, by the scheme the inventory named."""
    if scheme.startswith("unquantized-"):
        return Unquantized()
    if scheme.startswith(("fp8-", "int8-")):
        return ScaledFormat(scheme.split("-")[0], _block_of(kernel))
    if re.match(r"w\d+a\d+-", scheme):  # w4a16-g128, w8a16-channel, w4a8-g128
        from gemmguard.selfcheck.int_formats import IntLinearFormat

        return IntLinearFormat(scheme, kernel)
    if scheme in ("mxfp4", "mxfp8", "nvfp4"):
        from gemmguard.selfcheck.mx_formats import MicroscaledLinearFormat

        return MicroscaledLinearFormat(scheme)
    raise Unchecked(f"no reference for scheme {scheme}")


def moe_scheme(module: Any) -> str:
    """The MoE layer's scheme, named like the linear ones (fp8-block, unquantized-bf16, …)."""
    from gemmguard.selfcheck import int_formats, mx_formats

    # Packed and microscaled experts first: MXFP8 experts are fp8 too, with E8M0 scales.
    named = mx_formats.moe_scheme_of(module) or int_formats.moe_scheme_of(module)
    if named is not None:
        return named
    w13 = layer.tensor(module, "w13_weight")
    if w13 is None:
        return "unknown"
    if w13.dtype == torch.float8_e4m3fn:
        if layer.method_setting(module, "block_quant") or \
                layer.tensor(module, "w13_weight_scale_inv") is not None:
            return "fp8-block"
        scale = layer.tensor(module, "w13_weight_scale")
        per_channel = scale is not None and scale.dim() >= 2 and scale.shape[1] == w13.shape[1]
        return "fp8-channel" if per_channel else "fp8-tensor"
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if w13.dtype in names:
        return f"unquantized-{names[w13.dtype]}"
    return str(w13.dtype).replace("torch.", "")


def moe_format(scheme: str, module: Any) -> MoeFormat:
    """The format of an MoE layer's checkpoint experts, by its scheme."""
    if scheme.startswith("unquantized-"):
        return MoeUnquantized()
    if scheme.startswith("fp8-"):
        block_size = layer.config_setting(module, "weight_block_size")
        block = (int(block_size[0]), int(block_size[1])) if block_size else None
        if scheme == "fp8-block" and block is None:
            block = (128, 128)
        static = layer.config_setting(module, "activation_scheme") == "static"
        if block is not None:
            activation = Activation("group", size=block[1])
        elif static:
            scale = layer.tensor(module, "w13_input_scale")
            value = float(scale.detach().float().max()) if scale is not None else 1.0
            activation = Activation("static", static_scale=value)
        else:
            activation = Activation("token")
        return MoeFp8(block, activation)
    if re.match(r"w\d+a\d+-", scheme):
        from gemmguard.selfcheck import int_formats

        return int_formats.moe_format(scheme, module)
    if scheme in ("mxfp4", "mxfp8", "nvfp4"):
        from gemmguard.selfcheck.mx_formats import MicroscaledMoeFormat

        return MicroscaledMoeFormat(scheme)
    raise Unchecked(f"no reference for MoE scheme {scheme}")
