"""benchmarks.load against a fake OpenAI server: answers, streams, 5xx, lost and short replies."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from benchmarks.load import BatchResult, prompt, run_batch


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    tokens = body["max_tokens"]
    behaviour = body["model"]
    assert body["ignore_eos"] is True and body["temperature"] == 0.0
    if behaviour == "error500":
        return web.Response(status=500, text="engine dead")
    if behaviour == "short":
        tokens -= 1
    if behaviour == "drop":
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    if not body["stream"]:
        return web.json_response({"choices": [{"text": "x" * tokens}],
                                  "usage": {"completion_tokens": tokens}})
    assert body["stream_options"] == {"include_usage": True}
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if behaviour == "burst":  # every chunk at once, after the whole generation
        await asyncio.sleep(0.05)
    for _ in range(tokens):
        await response.write(b'data: {"choices": [{"text": "x"}]}\n\n')
        if behaviour == "trickle":
            await asyncio.sleep(0.02)
    usage = {"choices": [], "usage": {"completion_tokens": tokens}}
    await response.write(f"data: {json.dumps(usage)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


def against_fake(**kwargs: Any) -> BatchResult:
    async def main() -> BatchResult:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            return await run_batch(f"http://127.0.0.1:{port}", **kwargs)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def run(model: str, stream: bool, requests: int = 6, concurrency: int = 3) -> dict[str, Any]:
    return against_fake(model=model, server="fake", requests=requests,
                        concurrency=concurrency, stream=stream, max_tokens=4,
                        prompt_len=16).as_dict()


def test_every_request_is_sent_once_and_answered() -> None:
    found = run("ok", stream=False)
    assert (found["sent"], found["answered"], found["http_5xx"], found["lost"]) == (6, 6, 0, 0)
    assert found["output_tokens"] == 24
    assert found["requests_per_s"] > 0 and found["latency_s"]["p50"] > 0
    assert found["ttft_s"]["p50"] is None  # no time to first token without streaming


def test_streaming_measures_time_to_first_token() -> None:
    found = run("ok", stream=True)
    assert found["answered"] == 6 and found["output_tokens"] == 24
    assert 0 < found["ttft_s"]["p50"] <= found["latency_s"]["p50"]


def test_share_of_streams_delivered_at_the_end() -> None:
    assert run("trickle", stream=True, requests=2, concurrency=1)["first_chunk_at_end"] == 0.0
    assert run("burst", stream=True, requests=2, concurrency=1)["first_chunk_at_end"] == 1.0
    assert run("ok", stream=False)["first_chunk_at_end"] is None


def test_5xx_is_counted_not_raised() -> None:
    found = run("error500", stream=False)
    assert (found["answered"], found["http_5xx"]) == (0, 6)
    assert found["errors"] == ["HTTP 500: engine dead"]
    assert found["requests_per_s"] == 0.0


def test_a_dropped_connection_is_a_lost_request() -> None:
    found = run("drop", stream=True, requests=2, concurrency=1)
    assert (found["sent"], found["lost"], found["answered"]) == (2, 2, 0)


def test_an_answer_with_too_few_tokens_is_short() -> None:
    found = run("short", stream=True)
    assert (found["answered"], found["short"]) == (0, 6)
    assert "answered 3 tokens where 4 were asked" in found["errors"][0]


def test_prompts_are_distinct_repeatable_and_of_the_asked_length() -> None:
    texts = [prompt(i, 64) for i in range(5000)]
    assert len(set(texts)) == 5000 and {len(t) for t in texts} == {64}
    assert prompt(7, 8) == prompt(7, 8)


def test_chunks_merge_into_one_batch() -> None:
    first = against_fake(model="ok", server="fake", requests=3, concurrency=1, stream=True,
                         max_tokens=4, prompt_len=8)
    second = against_fake(model="error500", server="fake", requests=2, concurrency=1,
                          stream=True, max_tokens=4, prompt_len=8, first_prompt=3)
    merged = BatchResult.merge([first, second])
    assert merged.wall_s == first.wall_s + second.wall_s
    assert merged.counts() == {"sent": 5, "answered": 3, "http_5xx": 2, "http_other": 0,
                               "lost": 0, "short": 0}


