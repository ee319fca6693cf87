"""The kernel-swap eval: the same prompts, greedy, on a candidate server and a reference server.

Both servers serve the same model with different kernel choices (e.g. one started with
`gemmguard serve --deny-kernel NAME`). No labelled data is needed: the reference's own greedy
output is the yardstick. The maths is in `divergence`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gemmguard.errors import UsageError
from gemmguard.evaluation.client import ServerClient
from gemmguard.evaluation.divergence import Comparison, Step, Summary, compare, summarize

REPORT_SCHEMA = "gemmguard-eval-kernels/1"

# Short, varied prompts (prose, code, arithmetic, lists, another language): enough different
# contexts to reach many weights, small enough to run on the CPU demo model in seconds.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 17 multiplied by 23?\nA:",
    "The three primary colors are",
    "import numpy as np\n\nx = np.",
    "Translate to German: Good morning, how are you today?\n",
    "SELECT name, email FROM users WHERE",
    "Photosynthesis is the process by which",
    "1, 1, 2, 3, 5, 8, 13,",
    "Dear hiring manager, I am writing to",
    "In 1969, the Apollo 11 mission",
)


def load_prompts(path: Path) -> tuple[str, ...]:
    """Prompts from a file: a JSON list of strings (.json), or one prompt per line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"Cannot read prompts file '{path}': {exc.strerror}.") from exc
    if path.suffix == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UsageError(f"Prompts file {path} must hold a JSON list of strings.")
    else:
        # One per line; a JSON list lets prompts hold newlines.
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"Prompts file {path} holds no prompts.")
    return tuple(prompts)


def generate(
    client: ServerClient, model: str, prompt: str, max_tokens: int, top_logprobs: int
) -> list[Step]:
    """Greedy completion of `prompt` with the top log-probabilities at every generated position."""
    completion = client.completion(model, prompt, max_tokens, top_logprobs)
    try:
        logprobs = completion.choices[0].logprobs
        tokens, tops = logprobs.tokens, logprobs.top_logprobs
        if tokens is None or tops is None:
            raise TypeError("tokens or top_logprobs is null")
    except (AttributeError, IndexError, TypeError) as exc:
        raise UsageError(
            f"{client.base_url}/v1/completions answered without logprobs ({exc!r}); "
            "the kernel-swap eval needs an OpenAI completions API that returns them."
        ) from exc
    return [Step(str(t), {str(k): float(v) for k, v in (top or {}).items()})
            for t, top in zip(tokens, tops, strict=True)]


@dataclass(frozen=True)
class Side:
    """One server of the comparison."""

    base_url: str
    model: str
    build: dict[str, Any] | None
    kernels: dict[str, list[str]] | None = None

    def describe(self) -> str:
        """URL, model and, where the server reports them, the kernels of quantized layers."""
        text = f"{self.base_url}  model '{self.model}'"
        quantized = {s: k for s, k in (self.kernels or {}).items()
                     if not s.startswith(("unquantized", "kv-"))}
        if quantized:
            text += "  " + "; ".join(f"{s}: {', '.join(k)}" for s, k in quantized.items())
        return text


@dataclass(frozen=True)
class KernelSwapReport:
    """Everything one kernel-swap run found."""

    candidate: Side
    reference: Side
    prompts: tuple[str, ...]
    max_tokens: int
    top_logprobs: int
    comparisons: tuple[Comparison, ...]
    summary: Summary
    min_agreement: float
    max_mean_kl: float | None

    @property
    def failures(self) -> list[str]:
        out = []
        if self.summary.agreement < self.min_agreement:
            out.append(
                f"token agreement {self.summary.agreement:.4f} < {self.min_agreement} "
                "(--min-agreement)"
            )
        if self.max_mean_kl is not None and self.summary.mean_kl > self.max_mean_kl:
            out.append(
                f"mean KL {self.summary.mean_kl:.3g} nats > {self.max_mean_kl} (--max-mean-kl)"
            )
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def document(self) -> dict[str, Any]:
        """The JSON record: settings, summary, thresholds, verdict and every prompt's details."""
        return {
            "schema": REPORT_SCHEMA,
            "verdict": "pass" if self.passed else "fail",
            "failures": self.failures,
            "candidate": asdict(self.candidate),
            "reference": asdict(self.reference),
            "settings": {
                "max_tokens": self.max_tokens,
                "top_logprobs": self.top_logprobs,
                "temperature": 0,
                "kl": "KL(reference || candidate), nats, top-k with rest bucket (lower bound), "
                "at positions up to and including the first divergence",
            },
            "thresholds": {"min_agreement": self.min_agreement, "max_mean_kl": self.max_mean_kl},
            "summary": asdict(self.summary),
            "prompts": [
                {
                    "prompt": prompt,
                    "agreement": c.agreement,
                    "first_divergence": c.first_divergence,
                    "mean_kl": sum(c.kl) / len(c.kl) if c.kl else 0.0,
                    "kl": list(c.kl),
                    "top_k_overlap": list(c.overlap),
                    "candidate_tokens": list(c.candidate_tokens),
                    "reference_tokens": list(c.reference_tokens),
                }
                for prompt, c in zip(self.prompts, self.comparisons, strict=True)
            ],
        }

    def render(self) -> str:
        """The one-screen summary, worst prompts first."""
        s = self.summary
        lines = [
            "gemmguard eval-kernels: greedy generations, candidate vs reference",
            f"  candidate  {self.candidate.describe()}",
            f"  reference  {self.reference.describe()}",
            f"  {s.prompts} prompts x {self.max_tokens} tokens, top {self.top_logprobs} logprobs",
            "",
            f"  token agreement      {s.agreement:.4f}  ({s.matched} of {s.positions} positions)",
            f"  identical prompts    {s.identical_prompts} of {s.prompts}",
            "  earliest divergence  "
            + ("none" if s.earliest_divergence is None else f"token {s.earliest_divergence}"),
            f"  mean KL (ref||cand)  {s.mean_kl:.3g} nats over {s.kl_positions} positions "
            f"(max {s.max_kl:.3g}); top-k overlap {s.mean_top_k_overlap:.3f}",
            "",
        ]
        order = sorted(range(len(self.comparisons)), key=lambda i: self.comparisons[i].agreement)
        for i in order[:5]:
            c = self.comparisons[i]
            if c.first_divergence is None:
                continue
            lines.append(
                f"  diverges at token {c.first_divergence:>3}  agreement {c.agreement:.3f}  "
                f"{self.prompts[i][:48]!r}"
            )
        if self.passed:
            lines.append(f"PASS: token agreement {s.agreement:.4f} >= {self.min_agreement}.")
        else:
            lines.append("FAIL: " + "; ".join(self.failures) + ".")
        return "\n".join(lines)


def run_kernel_swap(
    candidate: ServerClient,
    reference: ServerClient,
    candidate_model: str,
    reference_model: str,
    prompts: Sequence[str],
    max_tokens: int,
    top_logprobs: int,
    min_agreement: float,
    max_mean_kl: float | None,
) -> KernelSwapReport:
    """Generate every prompt on both servers, one request at a time, and compare."""
    comparisons = []
    for prompt in prompts:
        # One request at a time and the same order on both sides, so batching cannot differ.
        cand = generate(candidate, candidate_model, prompt, max_tokens, top_logprobs)
        ref = generate(reference, reference_model, prompt, max_tokens, top_logprobs)
        comparisons.append(compare(cand, ref))
    return KernelSwapReport(
        candidate=Side(candidate.base_url, candidate_model, candidate.build(), candidate.kernels()),
        reference=Side(reference.base_url, reference_model, reference.build(), reference.kernels()),
        prompts=tuple(prompts),
        max_tokens=max_tokens,
        top_logprobs=top_logprobs,
        comparisons=tuple(comparisons),
        summary=summarize(comparisons),
        min_agreement=min_agreement,
        max_mean_kl=max_mean_kl,
    )
