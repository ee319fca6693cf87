"""The canary benchmark's report shows what was measured, and says when the goal is missed."""

from __future__ import annotations

from benchmarks.canary import render


def _rounds(canaries: int) -> dict:  # type: ignore[type-arg]
    row = {"requests_per_s": 10.0, "answered": 8, "sent": 8, "canaries_during": canaries}
    return {"on": [row], "off": [row]}


def test_render_lists_each_pattern_with_its_ratio_and_canaries() -> None:
    result = {
        "continuous load": {"ratio": {"median": 1.002, "low": 0.99, "high": 1.01},
                            "goal_met": True, "rounds": _rounds(0), "all_answered": True},
        "bursts with 2 s idle gaps": {"ratio": {"median": 0.97, "low": 0.95, "high": 0.99},
                                      "goal_met": False, "rounds": _rounds(3),
                                      "all_answered": True},
    }
    text = render(result, "python -m benchmarks.canary --rounds 1")
    assert "python -m benchmarks.canary --rounds 1" in text
    assert "| continuous load | 1.002 (0.990–1.010) | met | [0] | True |" in text
    assert "| bursts with 2 s idle gaps | 0.970 (0.950–0.990) | not met | [3] | True |" in text
