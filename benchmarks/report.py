"""The report: Markdown for people, JSON for machines, and a one-screen summary.

Everything here reads the JSON-ready results dict, so a report can be re-rendered from a
committed `benchmarks.json` (`python -m benchmarks --render docs/benchmarks.json --out docs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.formatting import NA, dur, median, mib, num, pct, secs, table, verdict, x
from benchmarks.stats import geometric_mean, is_number

SCHEMA_VERSION = 1
MARKDOWN_NAME = "benchmarks.md"
JSON_NAME = "benchmarks.json"
MAKE_BENCH_COMMAND = "python -m benchmarks --out docs"
PHASE_COLUMNS = ("api-server", "engine-core", "worker", "health", "first_completion")


def cell_verdict(cell: dict[str, Any], goal: str) -> str:
    """`met` / `NOT met`, flagged when the rounds fell on both sides of the bound."""
    text = verdict(cell["goals"][goal])
    if (cell.get("goal_bound_within_spread") or {}).get(goal):
        text += " (rounds on both sides)"
    return text


def resolution_note(path: dict[str, Any]) -> str | None:
    """A warning when the A/A noise is wider than the 1% the goals allow, else None."""
    width = ((path.get("noise") or {}).get("requests_per_s") or {}).get("self_relative_width")
    tolerance = min((abs(1 - g["bound"]) for g in (path.get("goals") or {}).values()),
                    default=0.01)
    if not width or width["median"] <= tolerance:
        return None
    return (f"This run's A/A noise ({pct(width['median'])}) is wider than the "
            f"{pct(tolerance, 0)} the goals allow: 'met' means no cost larger than the noise "
            f"showed, not that the cost is below {pct(tolerance, 0)}.")


def _goal_lines(path: dict[str, Any]) -> list[str]:
    lines = []
    for name, goal in path.get("goals", {}).items():
        label = "throughput (requests/s)" if name == "throughput" else "p50 latency"
        lines.append(
            f"- Goal {label} {goal['direction']} {goal['bound']:.2f}×: "
            f"{verdict(goal['overall_met'])} overall ({x(goal['overall_ratio'])}, geometric "
            f"mean of the cells' medians); met in {goal['cells_met']} of {goal['cells']} cells.")
    note = resolution_note(path)
    if note:
        lines.append(f"- {note}")
    return lines


def _noise_lines(results: dict[str, Any]) -> list[str]:
    path = results.get("request_path") or {}
    lines = []
    noise = path.get("noise", {})
    rps, p50 = noise.get("requests_per_s", {}), noise.get("latency_p50_s", {})
    if rps.get("self_relative_width"):
        lines.append(
            f"- Each server against itself over rounds (A/A): requests/s varied by "
            f"{pct(rps['self_relative_width'])} (median over cells and servers; worst "
            f"{pct(rps['self_relative_width']['high'])}), p50 latency by "
            f"{pct(p50.get('self_relative_width'))}. A ratio closer to 1 than this is noise.")
    else:
        lines.append("- One round only: no spread over rounds to judge the noise by.")
    host = path.get("host_load")
    if host:
        lines.append(
            f"- During the request path the host's CPUs were {pct(host['host_busy_fraction'])} "
            f"busy: {pct(host['benchmark_busy_fraction'])} this benchmark (servers and client), "
            f"{pct(host['other_busy_fraction'])} other work on the machine; load average "
            f"{num(host['load_avg_start'][0], 2)} at the start, {num(host['load_avg_end'][0], 2)} "
            "at the end.")
    lines.append(
        "- The machine is shared with other work (other engineers' servers and tests), and the "
        "load client shares its CPUs with both servers: treat differences of a few percent as "
        "noise unless the spread says otherwise.")
    return lines


def _request_path(path: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
    lines = ["## 1. Request path: gemmguard serve against plain vLLM", ""]
    if not path:
        return lines + ["Not measured (see Problems).", ""]
    engine = " ".join(settings.get("engine_args", [])) or "vLLM's defaults"
    lines += [
        f"Same bf16 demo checkpoint, same vLLM options (`{engine}`), same load: "
        f"{settings.get('requests', '?')} completions per batch, prompts of "
        f"{settings.get('prompt_len', '?')} tokens, exactly {settings.get('max_tokens', '?')} "
        "output tokens each (`ignore_eos`), every prompt distinct, from an aiohttp client on "
        "loopback. Within a round each batch is split into chunks of at least two waves of "
        "requests (at most 8 chunks) that alternate between the servers, A B B A …, so that "
        "both share each stretch of the machine's time; which server goes first alternates "
        "too. Ratios are gemmguard / plain within a round, shown as the median over rounds "
        "with the lowest and highest in brackets. TTFT is the time to the first streamed chunk "
        "carrying a token.", "",
        f"Both engines run their OpenMP threads on CPUs `{settings.get('omp_threads_bind')}` "
        "(`VLLM_CPU_OMP_THREADS_BIND`), leaving the rest to the API servers, gemmguard's "
        "supervisor and the client. On this machine vLLM's CPU engine often delivers a streamed "
        "request's chunks all at once, with its last token: with vLLM's default binding, most "
        "streamed requests at concurrency 1 did so while this benchmark was written; binding "
        "made it rarer, not rare (it also happens with one plain vLLM server alone, and with "
        "the API server on a CPU of its own). So TTFT percentiles mix two modes, and the "
        "absolute table gives each server's share of streamed requests whose first chunk came "
        "at 90% of their latency or later.",
        ""]
    rows = []
    for c in path["cells"]:
        r = c["ratio"]
        rows.append([str(c["concurrency"]), "yes" if c["stream"] else "no", str(c["rounds"]),
                     x(r["requests_per_s"]), x(r["output_tokens_per_s"]),
                     x(r["latency_p50_s"]), x(r["latency_p95_s"]),
                     x(r["ttft_p50_s"]) if c["stream"] else "–",
                     x(r["ttft_p95_s"]) if c["stream"] else "–",
                     cell_verdict(c, "throughput"), cell_verdict(c, "p50_latency")])
    lines += table(["concurrency", "stream", "rounds", "requests/s", "output tok/s",
                     "p50 latency", "p95 latency", "p50 TTFT", "p95 TTFT",
                     "throughput ≥ 0.99×", "p50 ≤ 1.01×"], rows)
    lines += ["", *_goal_lines(path), "", "Absolute values (median over rounds):", ""]
    rows = []
    for c in path["cells"]:
        g, p = c["gemmguard"], c["plain"]
        rows.append([str(c["concurrency"]), "yes" if c["stream"] else "no",
                     num(p["requests_per_s"]), num(g["requests_per_s"]),
                     num(p["output_tokens_per_s"], 0), num(g["output_tokens_per_s"], 0),
                     secs(median(p["latency_p50_s"]), "ms"),
                     secs(median(g["latency_p50_s"]), "ms"),
                     secs(median(p["ttft_p50_s"]), "ms") if c["stream"] else "–",
                     secs(median(g["ttft_p50_s"]), "ms") if c["stream"] else "–",
                     pct(p.get("first_chunk_at_end"), 0) if c["stream"] else "–",
                     pct(g.get("first_chunk_at_end"), 0) if c["stream"] else "–"])
    lines += table(["concurrency", "stream", "plain req/s", "gemmguard req/s", "plain tok/s",
                    "gemmguard tok/s", "plain p50", "gemmguard p50", "plain p50 TTFT",
                    "gemmguard p50 TTFT", "plain chunks at end", "gemmguard chunks at end"],
                   rows)
    return lines + [""]


def _startup(startup: dict[str, Any] | None) -> list[str]:
    lines = ["## 2. Start-up: time to the first successful completion", ""]
    if not startup:
        return lines + ["Not measured (see Problems).", ""]
    lines += ["From spawning the server to its first answered completion (polled every 0.25 s). "
              "gemmguard's includes its start-up self-check; the self-check's own time is "
              "`duration_seconds` from `/gemmguard/v1/selfcheck`.", ""]
    rows = []
    for m in startup["models"]:
        plain = secs(m["plain_first_completion_s"]) if m["plain_first_completion_s"] \
            else "no baseline¹"
        rows.append([m["model"], secs(m["gemmguard_first_completion_s"]), plain, x(m["ratio"]),
                     secs(m["difference_s"]) if is_number(m["difference_s"]) else NA,
                     secs(m["selfcheck_s"]), pct(m["selfcheck_share"], 2),
                     {True: "passed", False: "FAILED", None: NA}[m["selfcheck_passed"]],
                     ", ".join(m["selfcheck_kernels"]) or NA])
    lines += table(["checkpoint", "gemmguard", "plain vLLM", "ratio", "difference",
                     "self-check", "self-check share", "self-check", "kernels checked"], rows)
    lines += ["", "Where the time goes: seconds from spawn until a process of each kind was "
              "created (psutil), `/health` answered, and the first completion (medians). "
              "gemmguard serve's supervisor starts vLLM's API server as a child; plain vLLM is "
              "that API server itself. The last column is the share of the machine's CPU time "
              "that went to work other than this benchmark during the start-ups: a start-up "
              "that shared the machine with someone else's test run is slow for that reason.",
              ""]
    rows = []
    for m in startup["models"]:
        for server in ("gemmguard", "plain"):
            phases = m.get("phases", {}).get(server) or {}
            if not phases.get("first_completion"):
                continue
            other = phases.get("other_busy_fraction")
            rows.append([m["model"], server, *[secs(median(phases.get(name)))
                                               for name in PHASE_COLUMNS],
                         f"{pct(other, 0)} (up to {pct(other['high'], 0)})" if other else NA])
    lines += table(["checkpoint", "server", "API server process", "engine core process",
                    "worker process", "/health", "first completion",
                    "other work on the CPUs meanwhile"], rows)
    reasons = {m["plain_missing_reason"] for m in startup["models"] if m["plain_missing_reason"]}
    for reason in sorted(reasons):
        lines += ["", f"¹ {reason[0].upper()}{reason[1:]}."]
    rounds = sorted({str(s["round"]) for s in startup["samples"]})
    lines += ["", f"Samples per server and checkpoint: {len(rounds)} at most (rounds: "
              f"{', '.join(rounds)}; `request-path` is the pair started for section 1, one "
              "after the other). A range in brackets is the lowest and highest sample.", ""]
    return lines


def _memory(results: dict[str, Any]) -> list[str]:
    lines = ["## 3. Memory: peak resident memory of each server's whole process tree", ""]
    rows_in = (results.get("memory") or {}).get("rows", [])
    if not rows_in:
        return lines + ["Not measured (see Problems).", ""]
    lines += ["Sampled every second with psutil over every process of the tree (gemmguard: "
              "supervisor, API server, engine core, worker; plain: the same minus the "
              "supervisor); peaks of the sums. RSS counts a shared page (torch's libraries, "
              "say) once per process that maps it: an upper bound. USS counts only pages no "
              "other process maps: a lower bound. PSS splits each shared page among all the "
              "processes that map it, on the whole machine, so it also moves with what else "
              "runs there.", ""]
    rows = [[r["phase"], mib(r["gemmguard_tree_rss_bytes"]), mib(r["plain_tree_rss_bytes"]),
             x(r["rss_ratio"]), mib(r.get("gemmguard_tree_uss_bytes")),
             mib(r.get("plain_tree_uss_bytes")), x(r.get("uss_ratio")),
             mib(r["gemmguard_tree_pss_bytes"]), mib(r["plain_tree_pss_bytes"]),
             x(r["pss_ratio"])] for r in rows_in]
    lines += table(["phase", "gemmguard RSS", "plain RSS", "ratio", "gemmguard USS",
                     "plain USS", "ratio", "gemmguard PSS", "plain PSS", "ratio"], rows)
    first = rows_in[0]
    roles = sorted(set(first["gemmguard_by_role"]) | set(first["plain_by_role"]))
    if roles:
        lines += ["", f"Peak RSS per process, {first['phase']}:", ""]
        lines += table(["process", "gemmguard", "plain"],
                        [[role, mib(first["gemmguard_by_role"].get(role)),
                          mib(first["plain_by_role"].get(role))] for role in roles])
    models = ((results.get("startup") or {}).get("models")) or []
    if models:
        lines += ["", "The self-check's sample of the checkpoint, kept from load to the check:",
                  ""]
        lines += table(["checkpoint", "sample", "quantized weights", "fraction"],
                        [[m["model"], f"{num(m['sample_bytes'], 0)} bytes",
                          f"{num(m['model_bytes'], 0)} bytes", pct(m["sample_fraction"], 2)]
                         for m in models])
    return lines + [""]


def _load_held(held: dict[str, Any] | None) -> list[str]:
    lines = ["## 4. Load held", ""]
    if not held:
        return lines + ["Not measured (see Problems).", ""]
    lines += [f"Every request of section 1 (warm-up included): "
              f"{'all answered' if held['held'] else 'NOT all answered'}.", ""]
    lines += table(["server", "sent", "answered", "5xx", "lost (no response)", "other HTTP",
                     "short answers"],
                    [[s, str(t["sent"]), str(t["answered"]), str(t["http_5xx"]), str(t["lost"]),
                      str(t["http_other"]), str(t["short"])]
                     for s, t in held["servers"].items()])
    for server, errors in held.get("errors", {}).items():
        lines += ["", f"{server} errors: " + "; ".join(f"`{e}`" for e in errors)]
    return lines + [""]


def _kernels(kernels: dict[str, Any] | None, machine: dict[str, Any]) -> list[str]:
    lines = ["## 5. Portable FP8 block kernels against BF16 `F.linear` (issue 4)", ""]
    if not kernels:
        return lines + ["Not measured (see Problems).", ""]
    if "skipped" in kernels:
        return lines + [f"Skipped ({kernels['skipped']}).", ""]
    lines += [f"`{kernels.get('command', 'python -m benchmarks.kernels')}`, "
              f"{kernels['torch_threads']} torch thread(s): per-call time of "
              "`apply_weights` of gemmguard's kernel classes on vLLM's FP8 block config "
              "(128×128 weight blocks), median of "
              f"{kernels['repeats']} interleaved repeats; ratio = kernel time / BF16 `F.linear` "
              "time on the same weights (1.00 = as fast, 2.00 = twice as slow). One run.", ""]
    rows = []
    for r in kernels["rows"]:
        s, ratio = r["seconds"], r["ratio_vs_bf16"]
        rows.append([r["shape"], f"{r['n']}×{r['k']}", str(r["tokens"]),
                     dur(s["bf16_linear"]),
                     dur(s["PortableFp8BlockDequantKernel"]),
                     x(ratio["PortableFp8BlockDequantKernel"]),
                     dur(s["PortableFp8BlockEmulatedKernel"]),
                     x(ratio["PortableFp8BlockEmulatedKernel"])])
    lines += table(["layer", "N×K", "tokens", "BF16 F.linear", "Dequant (W8A16)", "ratio",
                     "Emulated (W8A8)", "ratio"], rows)
    diffs = [r.get("dequant_max_abs_diff") for r in kernels["rows"]]
    lines += ["",
              "- Dequant runs the same BF16 GEMM as `F.linear` on weights dequantized once at "
              "load, so its ratio is 1 plus the fixed per-call work of vLLM's `apply_weights` "
              "(parameter lookup, reshapes): visible at 1 token on the demo's small layers, "
              "gone on large ones. Its output matched `F.linear`'s on the same weights with a "
              f"largest absolute difference of {num(max(diffs), 3) if diffs else NA}.",
              "- Emulated quantizes the activations per 1×128 group and dequantizes the FP8 "
              "weight on every call, then multiplies in fp32: the scheme's exact arithmetic "
              "(what the self-check's expected bits are made of), not a fast path."]
    emulated = [r["ratio_vs_bf16"]["PortableFp8BlockEmulatedKernel"] for r in kernels["rows"]]
    if not machine.get("avx512_bf16", True) and any(v < 1 for v in emulated):
        lines.append("- This CPU has no AVX-512 BF16 instructions, so a BF16 GEMM is slower "
                     "here than an fp32 one: at many tokens the emulated kernel's fp32 GEMM "
                     "beats BF16 `F.linear` in spite of its extra work.")
    return lines + [""]


def render_markdown(results: dict[str, Any]) -> str:
    """The whole report as Markdown, command line first."""
    v, m = results.get("versions", {}), results.get("machine", {})
    dirty = ", with uncommitted changes under server/" if v.get("gemmguard_sources_changed") \
        else ""
    lines = ["# Benchmarks: what gemmguard costs on top of vLLM", "",
             "Produced by:", "", "```", results.get("command", "?"), "```", "",
             *(["`make bench` runs exactly this.", ""]
               if results.get("command") == MAKE_BENCH_COMMAND else []),
             f"Run {results.get('started', '?')}, {num(results.get('duration_s'), 0)} s. "
             f"gemmguard {v.get('gemmguard')} (commit {v.get('gemmguard_commit')}{dirty}), "
             f"vLLM {v.get('vllm')} ({v.get('vllm_distribution')}), torch {v.get('torch')}, "
             f"Python {v.get('python')}.", "",
             f"Machine: {m.get('cpu_model')}, {m.get('usable_cpus')} usable CPUs "
             f"({m.get('logical_cpus')} logical), {mib(m.get('memory_bytes'))} RAM, "
             f"{'virtual machine' if m.get('virtualized') else 'bare metal'}, AVX-512 "
             f"{'yes' if m.get('avx512') else 'no'} (BF16 "
             f"{'yes' if m.get('avx512_bf16') else 'no'}), AMX {'yes' if m.get('amx') else 'no'}; "
             f"{m.get('os')}.", "", "## Summary", "", *[f"- {s}" for s in summary_lines(results)],
             "", "## How noisy the runs were", "", *_noise_lines(results), ""]
    lines += _request_path(results.get("request_path"), results.get("settings") or {})
    lines += _startup(results.get("startup"))
    lines += _memory(results)
    lines += _load_held(results.get("load_held"))
    lines += _kernels(results.get("kernels"), results.get("machine") or {})
    lines += ["## Settings", "", "```json", json.dumps(results.get("settings", {}), indent=1),
              "```", "", "## Problems", ""]
    problems = results.get("problems") or []
    if not problems:
        lines.append("None: every section ran.")
    for p in problems:
        lines += [f"- **{p['section']}**:"]
        for cause in p.get("causes") or []:
            lines.append(f"  - `{cause}`")
        if p.get("log"):
            lines.append(f"  - its log: `{p['log']}`")
        lines += ["", "  ```", *[f"  {line}" for line in p["error"].splitlines()[-15:]], "  ```"]
    return "\n".join(lines) + "\n"


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The few lines a reader needs first; also what the command prints."""
    out = []
    path = results.get("request_path")
    if path:
        for name, goal in path.get("goals", {}).items():
            label = "throughput" if name == "throughput" else "p50 latency"
            out.append(f"Request path {label}: gemmguard/plain {x(goal['overall_ratio'])}, goal "
                       f"{goal['direction']} {goal['bound']:.2f}× {verdict(goal['overall_met'])}"
                       f" (met in {goal['cells_met']}/{goal['cells']} cells).")
        rps = (path.get("noise", {}).get("requests_per_s") or {}).get("self_relative_width")
        host = path.get("host_load") or {}
        out.append(f"Noise: requests/s of one server varied {pct(rps)} over rounds; other work "
                   f"used {pct(host.get('other_busy_fraction'))} of the host's CPU meanwhile.")
        note = resolution_note(path)
        if note:
            out.append(note)
    else:
        out.append("Request path: not measured (see Problems).")
    held = results.get("load_held")
    if held:
        sent = sum(t["sent"] for t in held["servers"].values())
        answered = sum(t["answered"] for t in held["servers"].values())
        errors = sum(t["http_5xx"] for t in held["servers"].values())
        lost = sum(t["lost"] for t in held["servers"].values())
        out.append(f"Load held: {answered}/{sent} requests answered, {errors} 5xx, {lost} lost.")
    for m in (results.get("startup") or {}).get("models", []):
        against = (f" vs plain {secs(m['plain_first_completion_s'])} ({x(m['ratio'])})"
                   if m["plain_first_completion_s"] else " (plain vLLM cannot load it here)")
        out.append(f"Start-up {m['model']}: gemmguard {secs(m['gemmguard_first_completion_s'])}"
                   f"{against}; self-check {secs(m['selfcheck_s'])} ="
                   f" {pct(m['selfcheck_share'], 2)} of gemmguard's start-up.")
    for r in (results.get("memory") or {}).get("rows", [])[:1]:
        out.append(f"Memory ({r['phase']}): RSS gemmguard {mib(r['gemmguard_tree_rss_bytes'])} vs"
                   f" plain {mib(r['plain_tree_rss_bytes'])} ({x(r['rss_ratio'])}); USS "
                   f"{x(r.get('uss_ratio'))}, PSS {x(r['pss_ratio'])}.")
    out += _kernel_summary((results.get("kernels") or {}).get("rows", []))
    if results.get("problems"):
        out.append(f"PROBLEMS: {len(results['problems'])} section(s) failed: "
                   + ", ".join(p["section"] for p in results["problems"]) + ".")
    return out


def _kernel_summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per shape group: each kernel's time ratio at every token count."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault("demo layers" if r["shape"].startswith("demo") else r["shape"],
                          []).append(r)
    out = []
    for group, found in groups.items():
        tokens = sorted({r["tokens"] for r in found})
        parts = []
        for kernel, short in (("PortableFp8BlockDequantKernel", "Dequant"),
                              ("PortableFp8BlockEmulatedKernel", "Emulated")):
            per_m = [geometric_mean(r["ratio_vs_bf16"][kernel] for r in found
                                    if r["tokens"] == m) for m in tokens]
            parts.append(f"{short} " + "/".join(num(v, 2) for v in per_m) + "×")
        out.append(f"Portable FP8 kernels, {group}, time vs BF16 F.linear at "
                   f"{'/'.join(map(str, tokens))} tokens: {', '.join(parts)}.")
    return out


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write benchmarks.md and benchmarks.json into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / MARKDOWN_NAME, out_dir / JSON_NAME
    results = {"schema_version": SCHEMA_VERSION, **results}
    js.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    md.write_text(render_markdown(results))
    return md, js
