"""The whole engine's self-check, as every rank reported it: counts, completeness, a summary.

Decisions are made at load, per rank, by `selfcheck.load_check`; this module reads what the
ranks report, for the API server, the CLI and the refusal report, and `refuse` stops a
start-up whose outcome does not serve.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from gemmguard.errors import SelfcheckFailed
from gemmguard.selfcheck.measure import FAILING, VERDICTS


@dataclass
class Outcome:
    """Every rank's results (dicts of `RankCheck.as_dict`) and the policies they ran under."""

    policy: str
    ranks: list[dict[str, Any]]
    unchecked_policy: str = "warn"

    @classmethod
    def of_report(cls, report: Mapping[str, Any]) -> Outcome:
        """The outcome a report (`as_dict`) was made from."""
        return cls(str(report.get("policy") or "fallback"), list(report.get("ranks") or ()),
                   str(report.get("unchecked_policy") or "warn"))

    @property
    def layers(self) -> list[dict[str, Any]]:
        return [layer for rank in self.ranks for layer in rank["layers"]]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(VERDICTS, 0)
        for layer in self.layers:
            counts[layer["verdict"]] += 1
        return counts

    @property
    def passed(self) -> bool:
        """Every GEMM-owning layer was checked and none runs a degraded or broken kernel."""
        return self.complete and not self.failing

    @property
    def failing(self) -> bool:
        """Some checked layer runs (or, refused, would run) a degraded or broken kernel."""
        return any(layer["verdict"] in FAILING for layer in self.layers)

    @property
    def complete(self) -> bool:
        """Every GEMM-owning layer was checked (none unchecked, none unseen by the check)."""
        return bool(self.layers) and not any(layer["verdict"] == "unchecked"
                                             for layer in self.layers)

    def coverage(self) -> dict[str, int]:
        """GEMM-owning modules over all ranks: held by the model, seen and checked by the check."""
        keys = ("modules_held", "modules_seen", "modules_checked")
        return {key: sum(int(rank.get(key) or 0) for rank in self.ranks) for key in keys}

    @property
    def refusal(self) -> str:
        return "; ".join(rank["refusal"] for rank in self.ranks if rank.get("refusal"))

    @property
    def serves(self) -> bool:
        """Whether the server may take traffic with this outcome."""
        return not self.refusal

    @property
    def action(self) -> str:
        """refuse, serve (passed), serve-degraded (a failing kernel serves: policy warn), or
        serve-incomplete (some layers unchecked, allowed by --selfcheck-unchecked)."""
        if self.refusal:
            return "refuse"
        if self.failing:
            return "serve-degraded"
        return "serve" if self.passed else "serve-incomplete"

    def replacements(self) -> list[dict[str, Any]]:
        """Layers whose kernel the check rejected, with what replaced it (if anything)."""
        return [{"layer": layer["layer"], **layer["replacement"]} for layer in self.layers
                if layer.get("replacement")]

    def rejected(self) -> list[tuple[str, str]]:
        """(kernel, verdict) of every layer whose kernel the check rejected: a replacement was
        tried (policy fallback), or the failing kernel refused start-up (policy fail). Under
        policy warn a failing kernel serves: it is reported, not rejected."""
        found = []
        for layer in self.layers:
            tried = layer.get("replacement") or {}
            if tried.get("rejected"):
                found.append((str(tried["rejected"]), str(tried.get("rejected_verdict"))))
            elif layer["verdict"] in FAILING and self.policy != "warn":
                found.append((str(layer["kernel"]), str(layer["verdict"])))
        return found

    def _failing_by_cure(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Failing layers whose loss vLLM made at load (FP8 block scales re-quantized to E8M0:
        whichever kernel runs them loses it), and the others (their kernel loses it)."""
        requantized: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        for rank in self.ranks:
            for layer in rank["layers"]:
                if layer["verdict"] not in FAILING:
                    continue
                e8m0 = rank.get("requant") == "e8m0" and layer["scheme"] == "fp8-block"
                (requantized if e8m0 else others).append(layer)
        return requantized, others

    def offending_kernels(self) -> list[str]:
        """Kernel classes still failing, as --deny-kernel takes them (a dispatcher with parts);
        not those of layers whose loss was vLLM's E8M0 re-quantization: denying their kernel
        does not undo it (`cure`)."""
        names: list[str] = []
        for layer in self._failing_by_cure()[1]:
            kernel = layer["kernel"]
            names.append(kernel.split("[")[0])
            if "[" in kernel:
                names.extend(kernel[kernel.index("[") + 1:].rstrip("]").split("|"))
        return list(dict.fromkeys(names))

    def cure(self) -> dict[str, Any]:
        """What removes every failing path: environment settings and `gemmguard serve` options.

        E8M0: vLLM re-quantizes FP8 block weights to power-of-two scales for every consumer
        when DeepGEMM is on (measured: TritonExperts then loses 0.7 bit, docs/gpu-proof-moe.md);
        `VLLM_USE_DEEP_GEMM=0` turns that off. Every other failing kernel: --deny-kernel.
        """
        requantized, _ = self._failing_by_cure()
        env = {"VLLM_USE_DEEP_GEMM": "0"} if requantized else {}
        options = [arg for name in self.offending_kernels() for arg in ("--deny-kernel", name)]
        return {"env": env, "options": options}

    def seconds(self) -> float:
        return max((rank["seconds"] for rank in self.ranks), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        sample = sum(rank["sample_bytes"] for rank in self.ranks)
        weights = sum(rank["model_bytes"] for rank in self.ranks)
        return {
            "passed": self.passed,
            "complete": self.complete,
            "policy": self.policy,
            "unchecked_policy": self.unchecked_policy,
            "action": self.action,
            "refusal": self.refusal,
            "counts": self.counts(),
            **self.coverage(),
            "duration_seconds": self.seconds(),
            "sample_bytes": sample,
            "model_bytes": weights,
            "sample_fraction": sample / weights if weights else 0.0,
            "replacements": self.replacements(),
            "offending_kernels": self.offending_kernels(),
            "cure": self.cure(),
            "unchecked": [{"layer": layer["layer"], "reason": layer["reason"]}
                          for layer in self.layers if layer["verdict"] == "unchecked"],
            "summary": summary(self),
            "ranks": self.ranks,
        }


def _bits(value: Any) -> str:
    return "non-finite" if value is None else f"{value}"


def _rejected(item: Mapping[str, Any]) -> str:
    """What was wrong with a replaced kernel: its verdict and excess, or, where its pooled
    excess is fine and experts failed it (an MoE layer), those experts."""
    experts = item.get("rejected_experts") or ()
    if experts:
        return f"{item['rejected_verdict']}: experts " + ", ".join(
            f"{e['expert']} {e['verdict']}"
            + ("" if e.get("excess_bits") is None else f" (excess {e['excess_bits']} bits)")
            for e in experts)
    return f"{item['rejected_verdict']}, excess {_bits(item['rejected_excess_bits'])} bits"


def summary(outcome: Outcome) -> str:
    """A one-screen report: failing, replaced and unchecked layers, and what to do."""
    counts = outcome.counts()
    unseen = sum(1 for layer in outcome.layers if layer.get("seen") is False)
    if outcome.complete:
        state = "complete"
    elif not outcome.layers:
        state = "INCOMPLETE: no GEMM-owning layer was checked"
    else:
        state = f"INCOMPLETE: {counts['unchecked']} unchecked"
        if unseen:
            state += f", {unseen} of them not seen by the check"
    lines = [
        f"gemmguard self-check: {counts['pass']} passed, {counts['degraded']} degraded, "
        f"{counts['broken']} broken, {counts['unchecked']} unchecked ({state}; "
        f"{outcome.seconds():.2f}s, policy {outcome.policy})."
    ]
    for layer in outcome.layers:
        if layer["verdict"] in FAILING:
            if layer["bits"] is None:
                what = "gives non-finite output (NaN/Inf)"
            else:
                what = (f"gives {layer['bits']} bits where the {layer['scheme']} scheme allows "
                        f"{_bits(layer['expected_bits'])} (excess {layer['excess_bits']} bits)")
            experts = [f"{e['expert']} {e['verdict']}" for e in layer.get("experts") or ()
                       if e.get("verdict") in FAILING]
            if experts:
                what += "; experts " + ", ".join(experts)
            lines.append(f"  {layer['verdict']:8} {layer['layer']}: {layer['kernel']} {what}")
    for item in outcome.replacements():
        if item.get("kernel"):
            lines.append(f"  replaced {item['layer']}: {item['rejected']} "
                         f"({_rejected(item)}) → {item['kernel']} "
                         f"({item['cost_ratio']}x its time)")
    unchecked = [layer for layer in outcome.layers if layer["verdict"] == "unchecked"]
    for layer in unchecked[:10]:
        lines.append(f"  unchecked {layer['layer']} ({layer['scheme']}, {layer['kernel']}): "
                     f"{layer['reason']}")
    if len(unchecked) > 10:
        lines.append(f"  … and {len(unchecked) - 10} more unchecked layers")
    if unchecked and not outcome.refusal:
        lines.append(f"  Not passed: an incomplete check is not a pass; it serves under "
                     f"--selfcheck-unchecked {outcome.unchecked_policy} (fail refuses).")
    if outcome.refusal:
        lines.append(f"  Refused: {outcome.refusal}.")
    cure = outcome.cure()
    if cure["env"]:
        lines.append("  vLLM re-quantized FP8 block weights to E8M0 (power-of-two) scales at load, "
                     "for every kernel: turn that off with VLLM_USE_DEEP_GEMM=0 (in the chart: "
                     "engine.env).")
    if cure["env"] or cure["options"]:
        env = "".join(f"{key}={value} " for key, value in cure["env"].items())
        lines.append(f"  Avoid these kernels with: {env}gemmguard serve … "
                     f"{' '.join(cure['options'])}".rstrip())
    return "\n".join(lines)


# `gemmguard selfcheck`'s exit codes; 3 is `gemmguard serve`'s refusal too (launcher).
EXIT_PASSED, EXIT_NOT_PASSED, EXIT_REFUSED = 0, 1, 3


def exit_code(outcome: Outcome) -> int:
    """3 when the check refuses to serve; 1 when a layer fails, or is unchecked unless
    --selfcheck-unchecked allow; else 0."""
    if outcome.refusal:
        return EXIT_REFUSED
    allowed = outcome.unchecked_policy == "allow" and not outcome.failing
    return EXIT_PASSED if outcome.passed or allowed else EXIT_NOT_PASSED


def refuse(outcome: Outcome, report_file: str, part: str) -> NoReturn:
    """Stop start-up: leave the report where `gemmguard serve` finds it (`report_file` + ".rank"
    + `part`, see launcher.refusal_report) and raise SelfcheckFailed with its summary."""
    text = summary(outcome)
    if report_file:
        Path(f"{report_file}.rank{part}").write_text(json.dumps(outcome.as_dict(), indent=1))
    raise SelfcheckFailed(f"gemmguard refuses to serve: {outcome.refusal}.\n{text}")
