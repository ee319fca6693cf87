"""benchmarks.startup_parity: the ratios of a run, whole or cut short, and each arm's settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import startup_parity


def _start(number: int, arm: str, health: float) -> dict[str, object]:
    return {"round": number, "arm": arm, "first_line_s": 1.0, "health_s": health}


def test_ratios_are_per_round_with_the_a_a_beside() -> None:
    starts = [_start(0, "plain-a", 99.0), _start(0, "gemmguard", 1.0), _start(0, "plain-b", 99.0),
              _start(1, "plain-a", 10.0), _start(1, "gemmguard", 12.0), _start(1, "plain-b", 14.0),
              _start(2, "gemmguard", 11.0), _start(2, "plain-b", 10.0), _start(2, "plain-a", 12.0)]
    by = startup_parity.ratios(starts, "health_s")
    ab, aa = by["gemmguard/plain"], by["plain-a/plain-b"]
    assert ab is not None and aa is not None
    assert (ab.n, ab.low, ab.high) == (2, 1.0, 1.0)  # round 0 (cold) is not counted
    assert (aa.low, aa.high) == pytest.approx((10 / 14, 12 / 10))


def test_a_round_cut_short_is_left_out_not_a_crash() -> None:
    starts = [_start(1, "plain-a", 10.0), _start(1, "gemmguard", 11.0), _start(1, "plain-b", 10.0),
              _start(2, "gemmguard", 50.0), _start(2, "plain-b", 10.0)]
    ab = startup_parity.ratios(starts, "health_s")["gemmguard/plain"]
    assert ab is not None and ab.n == 1 and ab.median == pytest.approx(1.1)
    assert startup_parity.ratios(starts[3:], "health_s")["gemmguard/plain"] is None


def test_each_arm_gets_its_own_settings_and_cache(tmp_path: Path) -> None:
    settings = ["gemmguard:VLLM_USE_DEEP_GEMM=1", "plain:VLLM_USE_DEEP_GEMM=0"]
    gemmguard = startup_parity.arm_env({"A": "1"}, "gemmguard", settings, tmp_path)
    plain_b = startup_parity.arm_env({"A": "1"}, "plain-b", settings, tmp_path)
    assert gemmguard == {"A": "1", "VLLM_USE_DEEP_GEMM": "1",
                         "VLLM_CACHE_ROOT": str(tmp_path / "gemmguard")}
    assert plain_b == {"A": "1", "VLLM_USE_DEEP_GEMM": "0",
                       "VLLM_CACHE_ROOT": str(tmp_path / "plain")}
    with pytest.raises(SystemExit, match="ARM:NAME=VALUE"):
        startup_parity.arm_env({}, "gemmguard", ["VLLM_USE_DEEP_GEMM=1"], None)


def test_a_warm_run_has_no_round_0_and_keeps_each_start_as_it_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device call may end mid-run: what was measured is on disk after every start."""
    made: list[str] = []

    def one_start(arm: str, *_: object) -> dict[str, object]:
        if len(made) == 4:
            raise KeyboardInterrupt  # the call's time is up
        made.append(arm)
        return {"arm": arm, "first_line_s": 1.0, "health_s": 10.0 + len(made)}

    monkeypatch.setattr(startup_parity, "one_start", one_start)
    out = tmp_path / "startup.json"
    with pytest.raises(KeyboardInterrupt):
        startup_parity.main(["--out", str(out), "--model", str(tmp_path), "--warm",
                             "--rounds", "2", "--cache-root", str(tmp_path / "cache")])
    result = json.loads(out.read_text())
    assert [(s["round"], s["arm"], s["cold"]) for s in result["starts"]] == [
        (1, "gemmguard", False), (1, "plain-b", False), (1, "plain-a", False),
        (2, "plain-b", False)]
    assert result["ratios"]["health_s"]["gemmguard/plain"]["n"] == 1


def test_the_selfcheck_line_is_found_in_a_vllm_log() -> None:
    log = ("(EngineCore pid=5677) INFO 12-07 09:47:46 [load_check.py:544] gemmguard self-check "
           "(rank 0): 129 pass, 0 degraded, 0 broken, 0 unchecked, 0 replaced in place, 10.77s "
           "(capture 6.89s, keep 0.03s), policy fallback\n")
    assert startup_parity.SELFCHECK_LINE.findall(log) == [
        "gemmguard self-check (rank 0): 129 pass, 0 degraded, 0 broken, 0 unchecked, "
        "0 replaced in place, 10.77s (capture 6.89s, keep 0.03s), policy fallback"]
