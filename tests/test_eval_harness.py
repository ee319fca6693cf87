"""`gemmguard eval` end to end: lm-eval runs GSM8K offline against a real demo server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Server
from gemmguard.errors import UsageError
from gemmguard.evaluation.commands import platform_note
from gemmguard.evaluation.config import load_config
from gemmguard.evaluation.harness import OFFLINE_ENV, go_offline, model_settings, run_harness

EVALS = Path(__file__).resolve().parent.parent / "evals"
DEMO_CONFIG = EVALS / "demo-cpu.yaml"


@pytest.fixture(scope="module")
def server(shared_server: Callable[..., Server]) -> Server:
    return shared_server("--demo-scheme", "fp8-block")


def _gemmguard_eval(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI from a scratch directory, with no usable Hugging Face hub or cache."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        # Any hub request would fail fast here: nothing listens on the discard port.
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    return subprocess.run(
        [sys.executable, "-m", "gemmguard.cli", "eval", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )


def test_model_settings_pick_the_endpoint_and_never_a_local_tokenizer() -> None:
    config = load_config(DEMO_CONFIG)
    model_type, args = model_settings(config, "http://h:1", "m", 4, 60)
    assert model_type == "local-completions"
    assert args["base_url"] == "http://h:1/v1/completions"
    assert (args["tokenizer_backend"], args["tokenized_requests"]) == (None, False)
    assert args["max_length"] == 1024


def test_missing_lm_eval_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in OFFLINE_ENV:
        monkeypatch.setenv(name, "0")  # restored after the test; go_offline overrides it
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UsageError, match=r"install it with: pip install 'gemmguard\[eval\]'"):
        run_harness(load_config(DEMO_CONFIG), EVALS / "tasks", "http://h:1", "m", 1)
    assert all(os.environ[name] == "1" for name in OFFLINE_ENV)


def test_go_offline_sets_both_hub_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    go_offline()
    assert {name: os.environ[name] for name in OFFLINE_ENV} == {
        "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
    }


def test_platform_note_flags_a_server_on_other_hardware() -> None:
    assert platform_note("cuda-blackwell", {"platform": "cuda"}) is None
    assert platform_note("cpu", {"platform": "cpu"}) is None
    assert platform_note("cpu", None) is None
    note = platform_note("cuda-blackwell", {"platform": "rocm"})
    assert note is not None and "reports platform 'rocm'" in note


@pytest.mark.e2e
def test_gsm8k_runs_offline_and_scores_every_sample(server: Server, tmp_path: Path) -> None:
    output = tmp_path / "result.json"
    done = _gemmguard_eval(tmp_path, str(DEMO_CONFIG), "--base-url", server.base_url,
                           "--limit", "4", "--output", str(output))
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(output.read_text())

    # The verdict was computed from the metric, and printed after every metric.
    assert result["verdict"] == "pass"
    (check,) = result["checks"]
    metrics = result["metrics"]["gsm8k_local"]
    assert check["metric"] == "exact_match,strict-match"
    assert check["measured"] == metrics["exact_match,strict-match"]
    lines = done.stdout.splitlines()
    assert lines[-2] == "PASS: 1 of 1 metrics within tolerance (rtol 0.0)."
    assert any("flexible-extract" in line and "not judged" in line for line in lines[:-2])

    # lm-eval ran the limit, on our local rows, through the completions endpoint.
    assert result["n_samples"]["gsm8k_local"] == {"original": 1319, "effective": 4}
    assert result["run"]["model_type"] == "local-completions"
    assert result["run"]["model"] == "gemmguard-demo"
    local = [json.loads(line)
             for line in (EVALS / "data/gsm8k/test.jsonl").read_text().splitlines()][:4]
    samples = result["samples"]["gsm8k_local"]
    assert [s["target"] for s in samples] == [row["answer"] for row in local]

    # Both extractions ran on every reply, and each metric is the mean of its per-sample scores.
    for name in ("strict-match", "flexible-extract"):
        scores = [s["filters"][name]["exact_match"] for s in samples]
        assert all(s["filters"][name]["extracted"] is not None for s in samples)
        assert metrics[f"exact_match,{name}"] == pytest.approx(sum(scores) / len(scores))
    assert all(isinstance(s["response"], str) for s in samples)
    # Offline: nothing was fetched into the empty Hugging Face home.
    assert not (tmp_path / "hf-home" / "hub").exists()


@pytest.mark.e2e
def test_below_tolerance_exits_1_through_the_chat_api(server: Server, tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["apply_chat_template"] = True
    data["tasks"][0]["metrics"][0]["value"] = 0.81
    data["source"] = {"kind": "placeholder", "reference": "test: a score the demo cannot reach"}
    del data["measured_with"]
    config = tmp_path / "demo-chat-cpu.yaml"
    config.write_text(yaml.safe_dump(data))
    output = tmp_path / "result.json"
    done = _gemmguard_eval(tmp_path, str(config), "--base-url", server.base_url + "/v1",
                           "--limit", "2", "--output", str(output),
                           "--tasks-dir", str(EVALS / "tasks"))
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads(output.read_text())
    assert result["verdict"] == "fail"
    assert result["run"]["model_type"] == "local-chat-completions"
    assert result["n_samples"]["gsm8k_local"]["effective"] == 2
    assert done.stdout.splitlines()[-2].startswith(
        "FAIL: 1 of 1 metrics below tolerance: gsm8k_local exact_match,strict-match 0.0000 < 0.8100"
    )


@pytest.mark.e2e
def test_config_for_another_model_is_refused(server: Server, tmp_path: Path) -> None:
    done = _gemmguard_eval(tmp_path, str(EVALS / "Qwen3.5-35B-A3B-FP8-cuda-blackwell.yaml"),
                           "--base-url", server.base_url)
    assert done.returncode == 2
    assert "The config is for 'Qwen/Qwen3.5-35B-A3B-FP8', but" in done.stderr
    assert "serves gemmguard-demo" in done.stderr
