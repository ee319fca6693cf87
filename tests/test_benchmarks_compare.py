"""benchmarks.compare: per-round ratios, goals, noise, load held and start-up rows."""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks.compare import (
    compare_cells,
    derive,
    goals_summary,
    load_held,
    memory_rows,
    noise,
    startup_models,
)


def batch(server: str, rnd: int, rps: float, p50: float, *, concurrency: int = 4,
          stream: bool = True, sent: int = 8, answered: int = 8, http_5xx: int = 0,
          lost: int = 0, warmup: bool = False) -> dict[str, Any]:
    """A batch row shaped like `BatchResult.as_dict()` plus the runner's round."""
    return {
        "server": server, "round": rnd, "concurrency": concurrency, "stream": stream,
        "wall_s": sent / rps, "sent": sent, "answered": answered, "http_5xx": http_5xx,
        "http_other": 0, "lost": lost, "short": sent - answered - http_5xx - lost,
        "requests_per_s": rps, "output_tokens_per_s": rps * 32, "output_tokens": answered * 32,
        "latency_s": {"p50": p50, "p95": 2 * p50, "mean": p50},
        "ttft_s": {"p50": p50 / 10, "p95": p50 / 5, "mean": p50 / 10} if stream
        else {"p50": None, "p95": None, "mean": None},
        "errors": ["HTTP 500: boom"] if http_5xx else [], "warmup": warmup,
    }


def test_ratios_are_taken_within_a_round_then_spread_over_rounds() -> None:
    batches = [batch("plain", 0, 10.0, 0.10), batch("gemmguard", 0, 9.9, 0.101),
               batch("plain", 1, 20.0, 0.05), batch("gemmguard", 1, 20.2, 0.05),
               batch("plain", 2, 10.0, 0.10), batch("gemmguard", 2, 10.0, 0.10)]
    [cell] = compare_cells(batches)
    rps = cell["ratio"]["requests_per_s"]
    # Within-round ratios 0.99, 1.01, 1.00: the round-to-round swing of 2× cancels out.
    assert rps["median"] == pytest.approx(1.00)
    assert (rps["low"], rps["high"]) == (pytest.approx(0.99), pytest.approx(1.01))
    assert rps["n"] == 3 and cell["rounds"] == 3
    assert cell["ratio"]["latency_p50_s"]["high"] == pytest.approx(1.01)
    assert cell["plain"]["requests_per_s"]["median"] == 10.0
    assert cell["goals"] == {"throughput": True, "p50_latency": True}


def test_cells_per_concurrency_and_stream_and_warmup_left_out() -> None:
    batches = [batch("plain", 0, 10, 0.1, concurrency=c, stream=s)
               for c in (1, 16) for s in (False, True)]
    batches += [batch("gemmguard", 0, 9, 0.12, concurrency=c, stream=s)
                for c in (1, 16) for s in (False, True)]
    batches.append(batch("gemmguard", -1, 1, 9.0, warmup=True))
    cells = compare_cells(batches)
    assert [(c["concurrency"], c["stream"]) for c in cells] == [
        (1, False), (1, True), (16, False), (16, True)]
    nonstream = cells[0]
    assert nonstream["ratio"]["ttft_p50_s"] is None
    assert nonstream["goals"] == {"throughput": False, "p50_latency": False}
    goals = goals_summary(cells)
    assert goals["throughput"]["overall_ratio"] == pytest.approx(0.9)
    assert goals["throughput"]["cells_met"] == 0 and goals["throughput"]["cells"] == 4
    assert goals["p50_latency"]["overall_met"] is False
    assert goals["p50_latency"]["direction"] == "<="


def test_a_round_with_one_side_missing_is_not_paired() -> None:
    [cell] = compare_cells([batch("plain", 0, 10, 0.1), batch("gemmguard", 0, 10, 0.1),
                            batch("plain", 1, 10, 0.1)])
    assert cell["rounds"] == 1


def test_noise_is_each_servers_disagreement_with_itself() -> None:
    batches = [batch("plain", 0, 10.0, 0.1), batch("gemmguard", 0, 10.0, 0.1),
               batch("plain", 1, 11.0, 0.1), batch("gemmguard", 1, 10.5, 0.1)]
    found = noise(compare_cells(batches))
    widths = found["requests_per_s"]["self_relative_width"]
    # plain 10 → 11 (width 1 / 10.5), gemmguard 10 → 10.5 (width 0.5 / 10.25)
    assert widths["high"] == pytest.approx(1 / 10.5)
    assert widths["low"] == pytest.approx(0.5 / 10.25)
    assert found["latency_p50_s"]["self_relative_width"]["median"] == 0.0


def test_noise_with_one_round_has_nothing_to_say() -> None:
    found = noise(compare_cells([batch("plain", 0, 10, 0.1), batch("gemmguard", 0, 10, 0.1)]))
    assert found["requests_per_s"]["self_relative_width"] is None


def test_load_held_counts_every_request_including_warmup() -> None:
    held = load_held([batch("plain", 0, 10, 0.1), batch("gemmguard", -1, 10, 0.1, warmup=True),
                      batch("gemmguard", 0, 10, 0.1)])
    assert held["held"] is True
    assert held["servers"]["gemmguard"]["sent"] == 16
    broken = load_held([batch("plain", 0, 10, 0.1),
                        batch("gemmguard", 0, 10, 0.1, answered=6, http_5xx=1, lost=1)])
    assert broken["held"] is False
    assert broken["servers"]["gemmguard"] == {"sent": 8, "answered": 6, "http_5xx": 1,
                                              "http_other": 0, "lost": 1, "short": 0}
    assert broken["errors"] == {"gemmguard": ["HTTP 500: boom"]}
    assert load_held([])["held"] is False


def sample(model: str, server: str, first: float, selfcheck_s: float | None = None,
           rss: int = 1000, pss: int | None = None, other_busy: float = 0.1,
           **extra: Any) -> dict[str, Any]:
    check = None if selfcheck_s is None else {
        "passed": True, "duration_seconds": selfcheck_s, "sample_bytes": 10,
        "model_bytes": 1000, "sample_fraction": 0.01, "kernels": ["k"]}
    return {"model": model, "server": server, "round": 0,
            "startup": {"first_completion_s": first, "health_s": first - 1,
                        "processes_started_s": {"api-server": 2.0, "worker": 20.0},
                        "host_load": {"other_busy_fraction": other_busy},
                        "selfcheck": check},
            "memory": {"tree_rss_bytes": rss, "tree_pss_bytes": pss}, **extra}


def test_startup_rows_give_ratio_and_selfcheck_share() -> None:
    rows = startup_models([
        sample("demo", "gemmguard", 60.0, 0.6, rss=1200, pss=600, other_busy=0.5),
        sample("demo", "plain", 50.0, pss=500),
        sample("demo", "gemmguard", 64.0, 0.4, rss=1100, pss=600),
        sample("demo", "plain", 54.0, pss=500),
        sample("fp8", "gemmguard", 70.0, 7.0, plain_missing_reason="no AMX"),
    ])
    demo, fp8 = rows
    assert demo["ratio"] == pytest.approx(62 / 52)
    assert demo["difference_s"] == pytest.approx(10.0)
    assert demo["selfcheck_share"]["median"] == pytest.approx((0.01 + 0.4 / 64) / 2)
    assert demo["selfcheck_passed"] is True and demo["sample_fraction"] == 0.01
    assert demo["phases"]["plain"]["worker"]["median"] == 20.0
    assert demo["phases"]["gemmguard"]["other_busy_fraction"]["high"] == 0.5
    assert demo["phases"]["gemmguard"]["health"]["median"] == 61.0
    assert demo["plain_missing_reason"] is None
    assert fp8["ratio"] is None and fp8["plain_first_completion_s"] is None
    assert fp8["plain_missing_reason"] == "no AMX"
    assert fp8["selfcheck_share"]["median"] == pytest.approx(0.1)
    memory = memory_rows(None, rows)
    assert memory[0]["rss_ratio"] == pytest.approx(1150 / 1000)
    assert memory[0]["pss_ratio"] == pytest.approx(1.2)
    assert memory[1]["rss_ratio"] is None and memory[1]["plain_tree_rss_bytes"] is None


def test_derive_fills_every_summary_from_the_raw_measurements() -> None:
    results = derive({
        "request_path": {"batches": [batch("plain", 0, 10, 0.1), batch("gemmguard", 0, 9, 0.1)],
                         "memory": {"gemmguard": {"tree_rss_bytes": 2}, "plain": {
                             "tree_rss_bytes": 1}}},
        "startup": {"samples": [sample("demo", "gemmguard", 60.0, 0.6)]},
    })
    path = results["request_path"]
    assert path["cells"][0]["ratio"]["requests_per_s"]["median"] == pytest.approx(0.9)
    assert path["goals"]["throughput"]["overall_met"] is False
    assert results["load_held"] is path["load_held"] and results["load_held"]["held"]
    assert results["startup"]["models"][0]["model"] == "demo"
    assert [r["rss_ratio"] for r in results["memory"]["rows"]] == [2.0, None]
    empty = derive({"request_path": None, "startup": None})
    assert empty["load_held"] is None and empty["memory"] == {"rows": []}
