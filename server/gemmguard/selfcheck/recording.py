"""Real kernels' outputs, recorded once where they run and replayed through the check anywhere.

A recording is what the check saw for one layer on a real engine: its sample of the checkpoint,
the kernel vLLM chose, and that kernel's sampled outputs for the check's own activations at every
token count, for several activation seeds. Activations and MoE routing are made on the host from
a seed (`measure.activations`, `measure.routing`), so they are regenerated at replay; the digest
recorded beside each seed's outputs proves that the replay feeds the check the very inputs the
kernel was given.

Recording: `GEMMGUARD_RECORD_DIR=DIR` on any gemmguard start writes every checked layer there, one
file per engine start and rank (`GEMMGUARD_RECORD_NAME` names it) and the samples, stored once by
digest under `DIR/samples/` (several kernels of one checkpoint share them). scripts/gpu-record.sh
records every kernel family vLLM runs on a GPU. Replay: `replay(recording, seed, fault)`.

Faults are applied to a real kernel's outputs, so that what a faulty kernel would add is seen on
top of the honest kernel's own rounding:
- `e8m0`: power-of-two scales where the scheme has fp32 ones (DeepGEMM's UE8M0 path): the weights
  re-quantized in the scheme's element format per 1×128 row block and, for linear layers, the
  activations quantized with power-of-two scales; the output gains exactly the difference this
  makes to the scheme's own product.
- `corrupt-block`: one 128-row block of outputs negated (a race between a weight conversion and
  its consumer garbles whole blocks).
- `corrupt-expert`: the outputs of the tokens routed to one expert negated (MoE only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import lzma
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemmguard import numerics
from gemmguard.selfcheck import measure, reference
from gemmguard.selfcheck.measure import TOKEN_COUNTS, LayerResult, MoeRun
from gemmguard.selfcheck.sample import ROW_BLOCK, LinearSample, MoeSample
from gemmguard.selfcheck.schemes import Activation

logger = logging.getLogger("vllm.gemmguard")

# Activation seeds each layer is recorded with: the false-positive budget is measured over all.
RECORD_SEEDS = (0, 1, 2, 3, 4)
LINEAR_FAULTS = ("e8m0", "corrupt-block")
MOE_FAULTS = ("e8m0", "corrupt-block", "corrupt-expert")
SUFFIX = ".pt.xz"


class StaleRecording(ValueError):
    """The replay cannot regenerate the inputs the kernel was given (the message says why)."""


@dataclass
class Recording:
    """One layer's kernel outputs on a real engine, with the sample the check took of it."""

    layer: str
    layer_type: str
    kernel: str
    scheme: str
    sample: LinearSample | MoeSample
    # seed → one output per token count (the sampled columns, as the kernel returned them)
    outputs: dict[int, list[torch.Tensor]]
    # seed → sha256 of the inputs (activations, and routing for MoE) the kernel was given
    inputs: dict[int, str]
    rounding: reference.MoeRounding | None = None
    # What the check said on the engine (seed 0), and where it ran.
    verdict: str = ""
    excess_bits: float | None = None
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return sorted(self.outputs)


# --- inputs ------------------------------------------------------------------------------------


def _digest(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _linear_inputs(sample: LinearSample, seed: int) -> list[torch.Tensor]:
    k = sample.weight.shape[1]
    return [measure.activations(tokens, k, sample.out_dtype, seed) for tokens in TOKEN_COUNTS]


def _moe_inputs(sample: MoeSample, seed: int) -> list[tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]]:
    out = []
    for tokens in TOKEN_COUNTS:
        weights, ids = measure.routing(sample, tokens, seed)
        out.append((measure.activations(tokens, sample.hidden, sample.out_dtype, seed),
                    weights, ids))
    return out


def inputs_digest(sample: LinearSample | MoeSample, seed: int) -> str:
    """The digest of the inputs the check gives a layer for `seed`."""
    if isinstance(sample, MoeSample):
        return _digest([t for run in _moe_inputs(sample, seed) for t in run])
    return _digest(_linear_inputs(sample, seed))


# --- recording on an engine --------------------------------------------------------------------


def _compact(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`y` in `dtype` where that loses nothing (a kernel's bf16 output read as fp32)."""
    y = y.detach().cpu()
    narrow = y.to(dtype)
    return narrow if torch.equal(narrow.float(), y.float()) else y.float()


@torch.inference_mode()
def record(module: Any, sample: LinearSample | MoeSample, kernel: str, layer_type: str,
           result: LayerResult) -> Recording:
    """Run the layer's kernel for every recording seed and keep its outputs."""
    outputs: dict[int, list[torch.Tensor]] = {}
    rounding = None
    for seed in RECORD_SEEDS:
        if isinstance(sample, MoeSample):
            runs = measure.run_moe(module, sample, seed)
            outputs[seed] = [_compact(run.y, sample.out_dtype) for run in runs]
        else:
            _, ys = measure.run_linear(module, sample, seed)
            outputs[seed] = [_compact(y, sample.out_dtype) for y in ys]
    if isinstance(sample, MoeSample):
        rounding = measure.moe_rounding(module)
    return Recording(sample.layer, layer_type, kernel, sample.scheme, sample, outputs,
                     {seed: inputs_digest(sample, seed) for seed in RECORD_SEEDS}, rounding,
                     result.verdict, result.excess_bits)


class Recorder:
    """Collects one engine start's recordings and writes them at the end of the load."""

    def __init__(self, directory: Path, name: str, origin: dict[str, str]) -> None:
        self.directory, self.name, self.origin = directory, name, origin
        self.recordings: list[Recording] = []

    def add(self, module: Any, sample: LinearSample | MoeSample, kernel: str,
            layer_type: str, result: LayerResult) -> None:
        try:
            recording = record(module, sample, kernel, layer_type, result)
        except Exception:  # recording is a side job: the check's verdict stands without it
            logger.exception("gemmguard: could not record %s", sample.layer)
            return
        recording.origin = {key: str(value) for key, value in self.origin.items()}
        self.recordings.append(recording)

    def flush(self, rank: int) -> Path | None:
        if not self.recordings:
            return None
        path = self.directory / f"{self.name}.rank{rank}{SUFFIX}"
        save(self.recordings, path)
        logger.info("gemmguard: recorded %d layers' kernel outputs to %s",
                    len(self.recordings), path)
        self.recordings = []
        return path


def recorder_from_env(origin: Callable[[], dict[str, str]]) -> Recorder | None:
    """The recorder GEMMGUARD_RECORD_DIR asks for (None: not recording); `origin` says where
    the recording is made, asked only when recording."""
    directory = os.environ.get("GEMMGUARD_RECORD_DIR", "")
    if not directory:
        return None
    name = os.environ.get("GEMMGUARD_RECORD_NAME", "") or "recording"
    return Recorder(Path(directory), name, origin())


# --- files -------------------------------------------------------------------------------------


def _activation(activation: Activation) -> dict[str, Any]:
    return dataclasses.asdict(activation)


def _sample_tensors(sample: LinearSample | MoeSample) -> dict[str, Any]:
    if isinstance(sample, LinearSample):
        return {"rows": sample.rows, "weight": sample.weight}
    return {"rows": sample.rows, "w13": {str(e): w for e, w in sample.w13.items()},
            "w2": {str(e): w for e, w in sample.w2.items()}}


def _sample_meta(sample: LinearSample | MoeSample) -> dict[str, Any]:
    meta: dict[str, Any] = {"kind": "moe" if isinstance(sample, MoeSample) else "linear",
                            "layer": sample.layer, "scheme": sample.scheme,
                            "activation": _activation(sample.activation),
                            "out_dtype": str(sample.out_dtype).removeprefix("torch.")}
    if isinstance(sample, MoeSample):
        meta.update(experts=sample.experts, global_ids=sample.global_ids,
                    num_experts=sample.num_experts, top_k=sample.top_k, hidden=sample.hidden,
                    expert_activations={str(e): [_activation(a) for a in pair]
                                        for e, pair in sample.expert_activations.items()},
                    w2_global_factor={str(e): f for e, f in sample.w2_global_factor.items()})
    return meta


def _write(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    with lzma.open(partial, "wb", preset=9) as f:
        torch.save(obj, f)
    partial.replace(path)  # several engines may record the same sample at once


def _read(path: Path) -> Any:
    with lzma.open(path, "rb") as f:
        return torch.load(f, weights_only=True)


def save(recordings: list[Recording], path: Path) -> None:
    """Write recordings to `path`, their samples once each under `path.parent/samples`."""
    entries = []
    for rec in recordings:
        tensors = _sample_tensors(rec.sample)
        key = _digest([t for t in _flat(tensors)])[:20]
        sample_path = path.parent / "samples" / f"{key}{SUFFIX}"
        if not sample_path.exists():
            _write(tensors, sample_path)
        entries.append({
            "layer": rec.layer, "layer_type": rec.layer_type, "kernel": rec.kernel,
            "scheme": rec.scheme, "sample": key, "sample_meta": _sample_meta(rec.sample),
            "outputs": {str(s): ys for s, ys in rec.outputs.items()},
            "inputs": {str(s): d for s, d in rec.inputs.items()},
            "rounding": None if rec.rounding is None else
            {"points": sorted(rec.rounding.points), "mode": rec.rounding.mode,
             "down_scale": rec.rounding.down_scale},
            "verdict": rec.verdict, "excess_bits": rec.excess_bits, "origin": rec.origin})
    _write(entries, path)


def _flat(tree: dict[str, Any]) -> list[torch.Tensor]:
    out = []
    for key in sorted(tree):
        value = tree[key]
        out += _flat(value) if isinstance(value, dict) else [value]
    return out


def _activation_of(meta: dict[str, Any]) -> Activation:
    return Activation(**meta)


def _sample_of(meta: dict[str, Any], tensors: dict[str, Any]) -> LinearSample | MoeSample:
    dtype = getattr(torch, meta["out_dtype"])
    if meta["kind"] == "linear":
        return LinearSample(meta["layer"], meta["scheme"], tensors["rows"], tensors["weight"],
                            _activation_of(meta["activation"]), dtype)
    return MoeSample(
        layer=meta["layer"], scheme=meta["scheme"], experts=list(meta["experts"]),
        global_ids=list(meta["global_ids"]), num_experts=meta["num_experts"],
        top_k=meta["top_k"], w13={int(e): w for e, w in tensors["w13"].items()},
        w2={int(e): w for e, w in tensors["w2"].items()}, rows=tensors["rows"],
        activation=_activation_of(meta["activation"]), out_dtype=dtype, hidden=meta["hidden"],
        expert_activations={int(e): (_activation_of(a), _activation_of(b))
                            for e, (a, b) in meta["expert_activations"].items()},
        w2_global_factor={int(e): float(f)
                          for e, f in meta.get("w2_global_factor", {}).items()})


def load(path: Path) -> list[Recording]:
    """The recordings of one file (its samples read from `path.parent/samples`)."""
    recordings = []
    samples: dict[str, dict[str, Any]] = {}
    for entry in _read(path):
        key = entry["sample"]
        if key not in samples:
            samples[key] = _read(path.parent / "samples" / f"{key}{SUFFIX}")
        rounding = entry["rounding"]
        recordings.append(Recording(
            entry["layer"], entry["layer_type"], entry["kernel"], entry["scheme"],
            _sample_of(entry["sample_meta"], samples[key]),
            {int(s): ys for s, ys in entry["outputs"].items()},
            {int(s): d for s, d in entry["inputs"].items()},
            None if rounding is None else
            reference.MoeRounding(frozenset(rounding["points"]), rounding["mode"],
                                  rounding.get("down_scale", "fp32")),
            entry["verdict"], entry["excess_bits"], dict(entry["origin"])))
    return recordings


def load_all(directory: Path) -> dict[str, list[Recording]]:
    """Every recording file under `directory`, by file name (without the suffix)."""
    return {path.name.removesuffix(SUFFIX): load(path)
            for path in sorted(directory.glob(f"*{SUFFIX}"))}


# --- faults ------------------------------------------------------------------------------------



# The scheme's element format: its largest value and how a value is rounded into it.
def _round_fp8(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-numerics.FP8_MAX, numerics.FP8_MAX).to(numerics.FP8_DTYPE).float()


def _round_int(limit: float) -> Callable[[torch.Tensor], torch.Tensor]:
    low = -limit - 1 if limit == 7 else -limit  # int4 codes run -8..7, int8 -127..127
    return lambda v: v.round().clamp(low, limit)


_ELEMENTS: dict[str, tuple[float, Callable[[torch.Tensor], torch.Tensor]]] = {
    "fp8": (numerics.FP8_MAX, _round_fp8),
    "int8": (127.0, _round_int(127.0)),
    "int4": (7.0, _round_int(7.0)),
    "e2m1": (numerics.E2M1_MAX, numerics.round_to_e2m1),
}


def element_format(scheme: str) -> str:
    """The element format a scheme stores weights in (unquantized weights: fp8, the format a
    kernel that quantizes what it should not would pick)."""
    if scheme.startswith(("int8-", "w8a")):
        return "int8"
    if scheme.startswith("w4a"):
        return "int4"
    if scheme in ("nvfp4", "mxfp4"):
        return "e2m1"
    return "fp8"


def e8m0_rows(weight: torch.Tensor, scheme: str = "fp8-block",
              block: int = ROW_BLOCK) -> torch.Tensor:
    """fp32 rows re-quantized in the scheme's element format with a power-of-two scale per
    1×`block` row block (DeepGEMM's UE8M0 path, for any format)."""
    limit, round_into = _ELEMENTS[element_format(scheme)]
    rows, k = weight.shape
    pad = -k % block
    blocks = torch.nn.functional.pad(weight.float(), (0, pad)).reshape(rows, -1, block)
    scale = numerics.pow2_ceil(blocks.abs().amax(dim=-1, keepdim=True) / limit)
    return (round_into(blocks / scale) * scale).reshape(rows, -1)[:, :k]


def e8m0_activations(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    """`x` quantized as the scheme says, but with power-of-two scales (fp8 and int8 schemes;
    others, already power-of-two or not quantized, as the scheme says)."""
    if activation.kind == "none" or activation.fmt not in ("fp8", "int8"):
        return reference.quantize_activations(x, activation)
    limit, round_into = _ELEMENTS[activation.fmt]
    xf = x.float()
    tokens, k = xf.shape
    if activation.kind == "group":
        blocks = xf.reshape(tokens, k // activation.size, activation.size)
        scale = numerics.pow2_ceil(blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / limit)
        return (round_into(blocks / scale) * scale).reshape(tokens, k)
    if activation.kind == "token":
        scale = numerics.pow2_ceil(xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / limit)
    elif activation.kind == "tensor":
        scale = numerics.pow2_ceil(xf.abs().amax().clamp(min=1e-12) / limit)
    else:  # static
        scale = numerics.pow2_ceil(torch.tensor(activation.static_scale, dtype=torch.float32))
    return round_into(xf / scale) * scale


def _negate_block(y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`y` with the sampled columns of one 128-row block negated (the middle block sampled)."""
    blocks = rows.div(ROW_BLOCK, rounding_mode="floor")
    present = sorted(set(blocks.tolist()))
    chosen = present[len(present) // 2]
    y = y.clone()
    y[:, blocks == chosen] *= -1
    return y


def _faulty_linear(sample: LinearSample, xs: list[torch.Tensor], ys: list[torch.Tensor],
                   fault: str) -> list[torch.Tensor]:
    if fault == "corrupt-block":
        return [_negate_block(y, sample.rows) for y in ys]
    if fault == "e8m0":
        # The real output plus what power-of-two scales change in the scheme's own product.
        activation, dtype = sample.activation, sample.out_dtype
        honest = reference.weights_at_mma(sample.weight, activation, dtype)
        faulty = reference.weights_at_mma(e8m0_rows(sample.weight, sample.scheme), activation,
                                          dtype)
        out = []
        for x, y in zip(xs, ys, strict=True):
            delta = (e8m0_activations(x, activation) @ faulty.t()
                     - reference.quantize_activations(x, activation) @ honest.t())
            out.append((y + delta).to(dtype).float())
        return out
    raise ValueError(f"unknown linear fault {fault!r}; known: {', '.join(LINEAR_FAULTS)}")


def _faulty_moe(sample: MoeSample, runs: list[MoeRun], fault: str) -> list[MoeRun]:
    if fault == "corrupt-block":
        return [dataclasses.replace(run, y=_negate_block(run.y, sample.rows)) for run in runs]
    if fault == "corrupt-expert":
        # The smallest-scale expert, which the check always samples and gives one token.
        target = sample.global_ids[0]
        out = []
        for run in runs:
            y = run.y.clone()
            y[run.ids[:, 0] == target] *= -1
            out.append(dataclasses.replace(run, y=y))
        return out
    if fault == "e8m0":
        faulty = dataclasses.replace(
            sample, w13={e: e8m0_rows(w, sample.scheme) for e, w in sample.w13.items()},
            w2={e: e8m0_rows(w, sample.scheme) for e, w in sample.w2.items()})
        out = []
        for run in runs:
            delta = (reference.moe_exact(faulty, run.x, run.weights, run.ids)
                     - reference.moe_exact(sample, run.x, run.weights, run.ids))
            out.append(dataclasses.replace(
                run, y=(run.y + delta).to(sample.out_dtype).float()))
        return out
    raise ValueError(f"unknown MoE fault {fault!r}; known: {', '.join(MOE_FAULTS)}")


# --- replay ------------------------------------------------------------------------------------


def faults_for(recording: Recording) -> tuple[str, ...]:
    return MOE_FAULTS if isinstance(recording.sample, MoeSample) else LINEAR_FAULTS


def replay(recording: Recording, seed: int, fault: str | None = None) -> LayerResult:
    """The check's verdict on the recorded outputs for `seed` (with `fault` applied to them)."""
    if seed not in recording.outputs:
        raise KeyError(f"{recording.layer} was recorded for seeds {recording.seeds}, not {seed}")
    sample = recording.sample
    if inputs_digest(sample, seed) != recording.inputs[seed]:
        raise StaleRecording(
            f"{recording.layer} (seed {seed}): the check's activations differ from those the "
            "kernel was given when recorded (measure.activations or measure.routing changed); "
            "record again with scripts/gpu-record.sh")
    ys = [y.float() for y in recording.outputs[seed]]
    with reference.exact_fp32():
        if isinstance(sample, MoeSample):
            runs = [MoeRun(x, weights, ids, y)
                    for (x, weights, ids), y in zip(_moe_inputs(sample, seed), ys, strict=True)]
            if fault:
                runs = _faulty_moe(sample, runs, fault)
            # The kernel family's rounding as the check models it now; where the family has
            # no entry, what the check used when recording (the CPU build's conversion).
            rounding = reference.rounding_of(recording.kernel,
                                             recording.rounding or reference.STAGED)
            return measure.judge_moe(sample, runs, recording.kernel, rounding)
        xs = _linear_inputs(sample, seed)
        if fault:
            ys = _faulty_linear(sample, xs, ys, fault)
        return measure.judge_linear(sample, xs, ys, recording.kernel, recording.layer_type)
