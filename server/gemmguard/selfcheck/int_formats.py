"""Integer weights packed into int32 words: GPTQ, AWQ and compressed-tensors pack-quantized.

These are the W4A16/WNA16 checkpoints (int4 or int8 codes with one scale per group of input
columns, optionally a zero point and an activation-order `g_idx`) and compressed-tensors'
W4A8-FP8 (int4 codes, bf16 group scales, fp8 per-token activations). Packed codes are stored
unsigned: compressed-tensors and GPTQ add 2^(bits-1) to symmetric codes, asymmetric ones
carry a zero point (GPTQ's original format stores it minus one).

Four layouts exist in vLLM's memory before post-processing:
- `n_first` (compressed-tensors): codes (N, K/pack) packed along K, scales (N, G),
  zero points (N/pack, G) packed along N;
- `k_first` (GPTQ, and compressed-tensors MoE experts under Marlin in vLLM 0.26, which loads
  them transposed): codes (K/pack, N) packed along K, scales (G, N), zero points (G, N/pack);
- `awq`: codes (K, N/pack) packed along N in AWQ's interleaved order, scales (G, N), zero
  points (G, N/pack) interleaved the same way;
- `unpacked` (compressed-tensors int-quantized, its W4A8 with int8 activations): signed codes
  one per int8, (N, K), scales (N, G), no zero points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gemmguard.selfcheck.schemes import (
    NO_ACTIVATION_QUANT,
    Activation,
    RowsPerExpert,
    Unchecked,
    mismatch,
    required_tensor,
    rows_of_extremes,
)
from gemmguard.vllm_adapter import layer

# AWQ packs the 8 (or 4) columns of a word in this order; AWQ_ORDER[b][i] is the column at slot i.
AWQ_ORDER = {4: (0, 2, 4, 6, 1, 3, 5, 7), 8: (0, 2, 1, 3)}
LAYOUTS = ("n_first", "k_first", "awq", "unpacked")


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words (..., W) → their unsigned codes (..., W·32/bits), lowest bits first."""
    pack = 32 // bits
    shifts = torch.arange(pack, dtype=torch.int32, device=words.device) * bits
    codes = (words.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * pack)


def _codes_at(words: torch.Tensor, slots: torch.Tensor, bits: int) -> torch.Tensor:
    """The code at slot `slots[j]` of word column j: (rows, len(slots))."""
    shifts = (slots * bits).to(torch.int32)
    return (words.to(torch.int32) >> shifts) & ((1 << bits) - 1)


@dataclass(frozen=True)
class PackedInts:
    """One 2-D packed weight with its scales, zero points and activation order, as loaded."""

    layout: str
    bits: int
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    zero_offset: int = 0  # GPTQ's original format stores zero points minus one
    k: int | None = None  # input columns, when packing padded them

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown packed layout {self.layout!r}; use one of {LAYOUTS}")
        if 32 % self.bits:
            raise Unchecked(f"no reference for {self.bits}-bit codes packed across int32 words")
        storage = torch.int8 if self.layout == "unpacked" else torch.int32
        if self.packed.dtype != storage or self.packed.ndim != 2:
            raise mismatch(f"{self.bits}-bit codes must be a 2-D {storage} tensor, got "
                            f"{self.packed.dtype} {tuple(self.packed.shape)}")
        if not self.scale.dtype.is_floating_point or self.scale.ndim != 2:
            raise mismatch(f"group scales must be a 2-D float tensor, got "
                            f"{self.scale.dtype} {tuple(self.scale.shape)}")
        pack = 32 // self.bits
        rows_in_scale = self.scale.shape[0 if self._n_first else 1]
        rows_in_codes = {"n_first": self.packed.shape[0], "k_first": self.packed.shape[1],
                         "awq": self.packed.shape[1] * pack,
                         "unpacked": self.packed.shape[0]}[self.layout]
        if rows_in_scale != rows_in_codes:
            raise mismatch(f"{rows_in_codes} output rows of codes but {rows_in_scale} rows "
                            f"of scales ({self.layout} layout)")
        groups = self.n_groups
        if self.g_idx is not None:
            if self.g_idx.numel() != self.n_cols:
                raise mismatch(f"g_idx has {self.g_idx.numel()} entries for {self.n_cols} "
                                "input columns")
            if int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= groups:
                raise mismatch(f"g_idx points outside the {groups} scale groups")
        elif self.n_cols % groups:
            raise mismatch(f"{groups} scale groups do not divide {self.n_cols} input columns")

    @property
    def _n_first(self) -> bool:
        return self.layout in ("n_first", "unpacked")

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @property
    def n_rows(self) -> int:
        return int(self.scale.shape[0] if self._n_first else self.scale.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scale.shape[1] if self._n_first else self.scale.shape[0])

    @property
    def n_cols(self) -> int:
        full = {"n_first": self.packed.shape[1] * self.pack,
                "k_first": self.packed.shape[0] * self.pack,
                "awq": self.packed.shape[0], "unpacked": self.packed.shape[1]}[self.layout]
        return int(self.k if self.k is not None and self.k <= full else full)

    def row_scales(self) -> torch.Tensor:
        """(N, G) fp32 scales."""
        scale = self.scale.detach().float().cpu()
        return scale if self._n_first else scale.t()

    def _slots(self, rows: torch.Tensor) -> torch.Tensor:
        """Slot of each output row inside its packed word (packing along N)."""
        within = rows % self.pack
        if self.layout != "awq":
            return within
        if self.bits not in AWQ_ORDER:
            raise Unchecked(f"no reference for {self.bits}-bit AWQ packing")
        inverse = torch.argsort(torch.tensor(AWQ_ORDER[self.bits]))
        return inverse[within]

    def codes(self, rows: torch.Tensor) -> torch.Tensor:
        """Unsigned codes (len(rows), K) of these output rows."""
        packed = self.packed.detach().cpu()
        if self.layout == "unpacked":
            codes = packed[rows].to(torch.int32)
        elif self.layout == "n_first":
            codes = unpack_words(packed[rows], self.bits)
        elif self.layout == "k_first":
            codes = unpack_words(packed[:, rows].t(), self.bits)
        else:
            codes = _codes_at(packed[:, rows // self.pack], self._slots(rows), self.bits).t()
        return codes[:, : self.n_cols]

    def zeros(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), G) zero points, or 2^(bits-1) for symmetric codes (0 if stored signed)."""
        if self.layout == "unpacked":
            return torch.zeros((len(rows), self.n_groups), dtype=torch.int32)
        if self.zero is None:
            return torch.full((len(rows), self.n_groups), 1 << (self.bits - 1), dtype=torch.int32)
        zero = self.zero.detach().cpu()
        if zero.dtype != torch.int32:
            raise mismatch(f"packed zero points must be int32, got {zero.dtype}")
        words, slots = rows // self.pack, self._slots(rows)
        if self.layout == "n_first":
            codes = _codes_at(zero[words], slots[:, None], self.bits)
        else:
            codes = _codes_at(zero[:, words], slots[None, :], self.bits).t()
        return codes + self.zero_offset

    def group_of_column(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.detach().cpu().long()
        return torch.arange(self.n_cols) // (self.n_cols // self.n_groups)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 (len(rows), K): (code − zero point) × scale of each column's group."""
        rows = rows.cpu().long()
        group = self.group_of_column()
        scale = self.row_scales()[rows][:, group]
        zero = self.zeros(rows)[:, group]
        return (self.codes(rows) - zero).float() * scale

    def extreme_rows(self) -> list[int]:
        scale = self.row_scales().abs()
        return sorted(set(rows_of_extremes(scale.amax(dim=1))
                          + rows_of_extremes(scale.amin(dim=1))))


_tensor = layer.tensor


def _gptq_zero_offset(module: Any) -> int:
    # GPTQ v1 checkpoints store zero points minus one; "gptq_v2" ones store them as they are.
    return 0 if layer.config_setting(module, "checkpoint_format") == "gptq_v2" else 1


def _symmetric(module: Any) -> bool:
    """GPTQ-Marlin says `is_sym`, GPTQ `sym`; symmetric unless the config says otherwise."""
    sym = layer.config_setting(module, "is_sym", "sym")
    return True if sym is None else bool(sym)


def linear_tensors(module: Any, bits: int, zero_points: bool, has_g_idx: bool) -> PackedInts:
    """The packed weight of a linear layer, whichever of the three formats it was loaded as."""
    k = layer.input_size_per_partition(module)
    packed = _tensor(module, "weight_packed")
    if packed is not None and packed.dtype == torch.int8:  # compressed-tensors int-quantized
        return PackedInts("unpacked", bits, packed, required_tensor(module, "weight_scale"),
                          k=k)
    if packed is not None:  # compressed-tensors
        scale = _tensor(module, "weight_scale")
        if scale is None:
            raise mismatch("weight_packed without weight_scale")
        return PackedInts("n_first", bits, packed, scale,
                          _tensor(module, "weight_zero_point") if zero_points else None,
                          _g_idx(module, "weight_g_idx", has_g_idx), 0, k)
    packed, scale = _tensor(module, "qweight"), _tensor(module, "scales")
    if packed is None or scale is None:
        raise mismatch("no weight_packed (compressed-tensors) or qweight/scales (GPTQ, AWQ)")
    pack = 32 // bits
    zero = _tensor(module, "qzeros") if zero_points else None
    if packed.ndim == 2 and packed.shape[1] == scale.shape[-1]:
        return PackedInts("k_first", bits, packed, scale, zero,
                          _g_idx(module, "g_idx", has_g_idx), _gptq_zero_offset(module), k)
    if packed.ndim == 2 and packed.shape[1] * pack == scale.shape[-1]:
        if zero is None:
            raise Unchecked("no reference for AWQ weights without zero points")
        return PackedInts("awq", bits, packed, scale, zero, None, 0, k)
    raise mismatch(f"qweight {tuple(packed.shape)} fits neither GPTQ nor AWQ packing of "
                    f"{bits}-bit codes with scales {tuple(scale.shape)}")


def _g_idx(module: Any, name: str, active: bool) -> torch.Tensor | None:
    # vLLM registers g_idx even when the checkpoint has none (left uninitialised), so it is
    # read only when the layer's config says activation order is on.
    if not active:
        return None
    g_idx = _tensor(module, name)
    if g_idx is None:
        raise mismatch(f"activation order is on but the layer has no {name}")
    return g_idx


def _bits_of(scheme: str, kernel: Any) -> int:
    mixed = layer.mixed_precision_config(kernel)
    bits = mixed["bits"] if mixed is not None else None
    if bits:
        return int(bits)
    try:
        return int(scheme[1:scheme.index("a")])
    except ValueError as exc:
        raise Unchecked(f"no reference for scheme {scheme}") from exc


# compressed-tensors schemes that keep a bf16 act_type in their kernel config but quantize
# activations to int inside the kernel: no reference models their activation rounding yet.
INT_ACTIVATION_SCHEMES = ("CompressedTensorsWNA8Int", "CompressedTensorsWNA4Int",
                          "CompressedTensorsWNA8O8Int")


class IntLinearFormat:
    """w{bits}a16 (GPTQ, AWQ, compressed-tensors) and w4a8 linear layers."""

    def __init__(self, scheme: str, kernel: Any) -> None:
        mixed = layer.mixed_precision_config(kernel)
        self.scheme = scheme
        self.bits = _bits_of(scheme, kernel)
        # None: no kernel config (vLLM ≤ 0.26's GPTQ/AWQ methods); read from the quant config.
        self.zero_points: bool | None = None if mixed is None else mixed["zero_points"]
        self.has_g_idx = bool(mixed and mixed["has_g_idx"])
        act_type = mixed["act_type"] if mixed is not None else None
        if "-int8-" in scheme:  # W4A8-int: bf16 declared, int8 per token inside the kernel
            act_type = torch.int8
        elif act_type is None:
            act_type = torch.float8_e4m3fn if scheme.split("-")[0].endswith("a8") else None
        # vLLM's W4A8 kernels quantize activations per token, dynamically.
        by_dtype: dict[torch.dtype | None, Activation] = {
            torch.float8_e4m3fn: Activation("token", fmt="fp8"),
            torch.int8: Activation("token", fmt="int8"),
        }
        self._activation = by_dtype.get(act_type, NO_ACTIVATION_QUANT)

    def tensors(self, module: Any) -> PackedInts:
        holder = type(layer.quant_scheme(module)).__name__
        if holder in INT_ACTIVATION_SCHEMES:
            raise Unchecked(f"no reference for scheme {self.scheme} under {holder} "
                            "(activations quantized to int inside the kernel)")
        zero_points, has_g_idx = self.zero_points, self.has_g_idx
        if zero_points is None:
            zero_points = not _symmetric(module) or \
                bool(layer.config_setting(module, "zero_point"))
            has_g_idx = bool(layer.config_setting(module, "desc_act"))
        return linear_tensors(module, self.bits, zero_points, has_g_idx)

    def n_rows(self, module: Any) -> int:
        return self.tensors(module).n_rows

    def rows(self, module: Any, rows: torch.Tensor) -> torch.Tensor:
        return self.tensors(module).rows(rows)

    def extreme_rows(self, module: Any) -> list[int]:
        return self.tensors(module).extreme_rows()

    def activation(self, module: Any, kernel: Any) -> Activation:
        self.tensors(module)  # refuses the int-activation schemes
        return self._activation


class IntMoeFormat(RowsPerExpert):
    """Packed-int experts (compressed-tensors WNA16 and W4A8, GPTQ, AWQ) with an expert dim."""

    def __init__(self, bits: int, activation: Activation) -> None:
        self.bits = bits
        self._activation = activation

    def tensors(self, module: Any, which: str, expert: int) -> PackedInts:
        packed = _tensor(module, f"{which}_weight_packed")
        k = _expert_k(module, which)
        unpacked = _tensor(module, f"{which}_weight")
        if packed is None and unpacked is not None and unpacked.dtype == torch.int8:
            int_scale = required_tensor(module, f"{which}_weight_scale")  # W4A8-int experts
            return PackedInts("unpacked", self.bits, unpacked[expert], int_scale[expert], k=k)
        if packed is not None:  # compressed-tensors
            scale = _tensor(module, f"{which}_weight_scale")
            if scale is None or packed.ndim != 3:
                raise mismatch(f"{which}_weight_packed {tuple(packed.shape)} without 3-D "
                                f"{which}_weight_scale")
            transposed = layer.is_transposed(packed)
            zero = _tensor(module, f"{which}_weight_zero_point")
            active = str(layer.method_setting(module, "actorder")).lower().endswith("group")
            g_idx = _g_idx(module, f"{which}_weight_g_idx", active)
            return PackedInts("k_first" if transposed else "n_first", self.bits,
                              packed[expert], scale[expert],
                              None if zero is None else zero[expert],
                              None if g_idx is None else g_idx[expert], 0, k)
        packed, scale = _tensor(module, f"{which}_qweight"), _tensor(module, f"{which}_scales")
        if packed is None or scale is None:
            raise mismatch(f"no {which}_weight_packed or {which}_qweight/{which}_scales")
        if packed.dtype != torch.int32:
            raise Unchecked(f"no reference for MoE experts repacked at load ({which}_qweight is "
                            f"{packed.dtype}; vLLM's moe_wna16 layout)")
        zero = _tensor(module, f"{which}_qzeros")
        pack = 32 // self.bits
        if packed.shape[2] == scale.shape[2]:  # GPTQ
            sym = _symmetric(module)
            g_idx = _g_idx(module, f"{which}_g_idx", bool(layer.config_setting(module, "desc_act")))
            return PackedInts("k_first", self.bits, packed[expert], scale[expert],
                              None if sym or zero is None else zero[expert],
                              None if g_idx is None else g_idx[expert],
                              _gptq_zero_offset(module), k)
        if packed.shape[2] * pack == scale.shape[2] and zero is not None:  # AWQ
            return PackedInts("awq", self.bits, packed[expert], scale[expert], zero[expert],
                              None, 0, k)
        raise mismatch(f"{which}_qweight {tuple(packed.shape)} fits neither GPTQ nor AWQ "
                        f"packing with scales {tuple(scale.shape)}")

    def expert_magnitude(self, module: Any) -> torch.Tensor:
        scale = _tensor(module, "w13_weight_scale")
        if scale is None:
            scale = _tensor(module, "w13_scales")
        if scale is None:
            raise mismatch("no w13_weight_scale or w13_scales")
        return scale.detach().float().abs().reshape(scale.shape[0], -1).amax(dim=1).cpu()

    def activation(self, module: Any) -> Activation:
        return self._activation


def _expert_k(module: Any, which: str) -> int | None:
    """Input columns of one expert's w13 (hidden) or w2 (intermediate per partition)."""
    if which == "w13":
        return layer.moe_hidden_size(module)
    return layer.moe_intermediate_per_partition(module)


def moe_scheme_of(module: Any) -> str | None:
    """w{bits}a16-g{group} / -channel, or w4a8-g{group}, for packed-int experts; else None."""
    method_name = type(layer.quant_method(module)).__name__
    packed = _tensor(module, "w13_weight_packed")
    qweight = _tensor(module, "w13_qweight")
    if "W4A8Int8" in method_name:  # int4 codes in int8, int8 activations
        return f"w4a8-int8-{_group_name(layer.method_setting(module, 'group_size'))}"
    if packed is not None and packed.dtype == torch.int32:
        weight_quant = layer.method_setting(module, "weight_quant")
        bits = int(layer.method_setting(module, "num_bits") or
                   getattr(weight_quant, "num_bits", 0) or 4)
        group = layer.method_setting(module, "group_size")
        if group is None:
            group = getattr(weight_quant, "group_size", None)
        w4a8 = layer.moe_backend_name(module, ("w4a8_backend",)) or "W4A8" in method_name
        return f"w{bits}{'a8' if w4a8 else 'a16'}-{_group_name(group)}"
    if qweight is not None:
        bits = int(layer.config_setting(module, "weight_bits") or 4)
        return f"w{bits}a16-{_group_name(layer.config_setting(module, 'group_size'))}"
    return None


def _group_name(group: Any) -> str:
    return "channel" if group in (None, -1, 0) else f"g{int(group)}"


def moe_format(scheme: str, module: Any) -> IntMoeFormat:
    """The expert format of a packed-int MoE scheme named by `moe_scheme_of`."""
    bits = int(scheme[1:scheme.index("a")])
    activation = NO_ACTIVATION_QUANT
    if scheme.split("-")[0].endswith("a8"):
        activation = Activation("token", fmt="int8" if "-int8-" in scheme else "fp8")
    return IntMoeFormat(bits, activation)
