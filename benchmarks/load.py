"""The loopback load client: a bounded batch of /v1/completions at a fixed concurrency.

Every request asks for exactly `max_tokens` tokens (`ignore_eos`: the demo model is random
and may sample its end token at any step), so both servers do the same work. A request
counts as answered only with HTTP 200 and all its tokens; anything else is counted by
kind (status code, connection error, short answer) so that no request is lost unseen.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.stats import latency_summary, ratio

# A request that takes longer than this on loopback is a lost request, not a slow one.
REQUEST_TIMEOUT_S = 300.0
# A streamed request whose first chunk came this late (share of its latency) got all its
# chunks at once at the end: its TTFT says when streaming was delivered, not generated.
AT_END = 0.9


def prompt(index: int, length: int) -> str:
    """Prompt number `index`: `length` ASCII characters (one demo token each), the same every run.

    Distinct indices give distinct prompts, so vLLM's prefix cache does not serve a request
    from an earlier one.
    """
    return "".join(random.Random(index).choices("abcdefghijklmnopqrstuvwxyz ", k=length))


@dataclass
class RequestResult:
    """One request as the client saw it."""

    ok: bool
    status: int | None
    latency_s: float
    ttft_s: float | None = None
    output_tokens: int = 0
    error: str | None = None


@dataclass
class BatchResult:
    """A batch of requests against one server: what was sent, answered, and how fast."""

    server: str
    concurrency: int
    stream: bool
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: list[BatchResult]) -> BatchResult:
        """One batch from several run back to back against the same server (chunks)."""
        first = parts[0]
        return cls(first.server, first.concurrency, first.stream, sum(p.wall_s for p in parts),
                   [r for p in parts for r in p.results])

    @property
    def answered(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def counts(self) -> dict[str, int]:
        """Requests sent, answered, and failed by kind (5xx, other HTTP, lost, short)."""
        failed = [r for r in self.results if not r.ok]
        return {
            "sent": len(self.results),
            "answered": len(self.answered),
            "http_5xx": sum(1 for r in failed if r.status is not None and r.status >= 500),
            "http_other": sum(1 for r in failed if r.status is not None and r.status < 500
                              and r.status != 200),
            "lost": sum(1 for r in failed if r.status is None),
            "short": sum(1 for r in failed if r.status == 200),
        }

    def as_dict(self) -> dict[str, Any]:
        answered = self.answered
        tokens = sum(r.output_tokens for r in answered)
        streamed = [r for r in answered if r.ttft_s is not None]
        at_end = [r for r in streamed if r.ttft_s >= AT_END * r.latency_s]  # type: ignore[operator]
        errors = [r.error for r in self.results if r.error]
        return {
            "server": self.server,
            "concurrency": self.concurrency,
            "stream": self.stream,
            "wall_s": self.wall_s,
            **self.counts(),
            "requests_per_s": ratio(len(answered), self.wall_s),
            "output_tokens_per_s": ratio(tokens, self.wall_s),
            "output_tokens": tokens,
            "latency_s": latency_summary([r.latency_s for r in answered]),
            "ttft_s": latency_summary([r.ttft_s for r in streamed]),  # type: ignore[misc]
            "first_chunk_at_end": ratio(len(at_end), len(streamed)),
            "errors": sorted(set(errors))[:5],
        }


def _body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0.0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _stream(response: aiohttp.ClientResponse, start: float) -> tuple[float | None, int]:
    """Read an SSE completion stream: time of the first token, and tokens reported."""
    ttft = None
    chunks = 0
    usage_tokens = None
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if event.get("choices"):
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - start
        if event.get("usage"):
            usage_tokens = int(event["usage"]["completion_tokens"])
    return ttft, usage_tokens if usage_tokens is not None else chunks


async def one_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      expected_tokens: int) -> RequestResult:
    """Send one completion and classify the answer; never raises for a failed request."""
    start = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                text = (await response.text())[:200]
                return RequestResult(False, response.status, time.perf_counter() - start,
                                     error=f"HTTP {response.status}: {text}")
            if body["stream"]:
                ttft, tokens = await _stream(response, start)
            else:
                reply = await response.json()
                ttft, tokens = None, int(reply["usage"]["completion_tokens"])
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
        return RequestResult(False, None, time.perf_counter() - start,
                             error=f"{type(exc).__name__}: {exc}"[:200])
    latency = time.perf_counter() - start
    if tokens != expected_tokens:
        return RequestResult(False, 200, latency, ttft, tokens,
                             error=f"answered {tokens} tokens where {expected_tokens} were asked")
    return RequestResult(True, 200, latency, ttft, tokens)


async def run_batch(base_url: str, model: str, *, server: str, requests: int, concurrency: int,
                    stream: bool, max_tokens: int, prompt_len: int,
                    first_prompt: int = 0) -> BatchResult:
    """Send `requests` completions with at most `concurrency` in flight; time the whole batch.

    The prompts are numbers `first_prompt` onwards (see `prompt`).
    """
    url = base_url + "/v1/completions"
    texts = [prompt(first_prompt + i, prompt_len) for i in range(requests)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[RequestResult] = []
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body = _body(model, texts[i], max_tokens, stream)
                results.append(await one_request(session, url, body, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return BatchResult(server, concurrency, stream, wall, results)


def batch(base_url: str, model: str, **kwargs: Any) -> BatchResult:
    """`run_batch` from synchronous code."""
    return asyncio.run(run_batch(base_url, model, **kwargs))
