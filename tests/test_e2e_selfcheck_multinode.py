"""End-to-end: a refusal on a worker node reaches the leader (vLLM's multi-node backend on CPU).

Two "nodes" on this machine: a leader (`gemmguard serve … --nnodes 2 --node-rank 0`) and a
headless worker (`--node-rank 1 --headless`), one rank each (`--tensor-parallel-size 2`), one core
each. Only the worker is given a faulty kernel, as a node with a bad driver or library would be.
Its rank refuses; the leader's rank passes. The leader must still exit 3 with the whole report
(naming the worker's layers), lingering on its port with it, although the report file of the
refusing rank is on the other node's disk; the worker's own server exits 3 too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import FAST_ENGINE_ARGS, free_port
from gemmguard.demo.checkpoint import DemoSpec, write_demo_model

pytestmark = pytest.mark.e2e

LINGER_S = 30
FAULTY = "CorruptBlockFp8BlockKernel"


def _node(model: Path, rank: int, master_port: int, http_port: int, tmp: Path,
          env: dict[str, str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "gemmguard.cli", "serve", str(model),
           "--selfcheck-policy", "fail", "--tensor-parallel-size", "2",
           "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
           "--master-port", str(master_port), "--host", "127.0.0.1", "--port", str(http_port),
           *FAST_ENGINE_ARGS, *(["--headless"] if rank else [])]
    full_env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(rank),
                "GEMMGUARD_STATE_DIR": str(tmp / f"state{rank}"), **env}
    # Files, not pipes: a full pipe would stop a server that logs more than it is read.
    with (tmp / f"node{rank}.log").open("w") as log:
        return subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)


def _get(url: str) -> requests.Response | None:
    try:
        return requests.get(url, timeout=5)
    except requests.ConnectionError:
        return None


def _report_while_lingering(port: int, leader: subprocess.Popen[str], worker_port: int,
                            worker_metrics: list[str]) -> dict[str, object]:
    """The leader's lingering report; meanwhile every /metrics the worker's pod answered."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and leader.poll() is None:
        scraped = _get(f"http://127.0.0.1:{worker_port}/metrics")
        if scraped is not None and scraped.status_code == 200:
            worker_metrics.append(scraped.text)
        reply = _get(f"http://127.0.0.1:{port}/gemmguard/v1/selfcheck")
        if reply is not None and reply.status_code == 200:
            return dict(reply.json())
        time.sleep(0.5)
    raise AssertionError(f"the leader never lingered with a report (exit {leader.poll()})")


def _value(exposition: str, name: str) -> float | None:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def test_a_refusing_worker_node_stops_the_leader_with_the_whole_report(tmp_path: Path) -> None:
    # 4 KV heads: the k/v projections split over two ranks keep whole 128-row FP8 blocks.
    model = write_demo_model(tmp_path / "fp8-block-kv4", "fp8-block", 0,
                             DemoSpec(num_key_value_heads=4))
    master, http, worker_http = free_port(), free_port(), free_port()
    leader = _node(model, 0, master, http, tmp_path,
                   {"GEMMGUARD_SELFCHECK_REFUSAL_LINGER": str(LINGER_S)})
    worker = _node(model, 1, master, worker_http, tmp_path,
                   {"GEMMGUARD_TEST_KERNELS": "corrupt-block",
                    "GEMMGUARD_SELFCHECK_REFUSAL_LINGER": str(LINGER_S)})
    worker_metrics: list[str] = []
    try:
        report = _report_while_lingering(http, leader, worker_http, worker_metrics)
        ready = requests.get(f"http://127.0.0.1:{http}/gemmguard/ready", timeout=5)
        # The refusing worker's pod lingers on its own port too, with its refusal counted.
        lingering = _get(f"http://127.0.0.1:{worker_http}/metrics")
        leader.wait(timeout=LINGER_S + 60)
        worker.wait(timeout=120)
    finally:
        for process in (leader, worker):
            if process.poll() is None:
                os.killpg(process.pid, 9)
    leader_log, worker_log = ((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
    assert (leader.returncode, worker.returncode) == (3, 3), leader_log[-3000:]
    assert ready.status_code == 503
    ranks = {rank["rank"]: rank for rank in report["ranks"]}  # type: ignore[attr-defined]
    assert sorted(ranks) == [0, 1]
    verdicts = {r: {row["verdict"] for row in rank["layers"] if row["scheme"] == "fp8-block"}
                for r, rank in ranks.items()}
    assert verdicts == {0: {"pass"}, 1: {"broken"}}  # the failure is on the worker's rank only
    assert report["passed"] is False and "failed the self-check" in str(report["refusal"])
    for log in (leader_log, worker_log):  # each server's own summary of the whole report
        assert f"\n  broken   model.layers.0.mlp.down_proj: {FAULTY}" in log
        assert f"--deny-kernel {FAULTY}" in log

    # While the worker node loaded, its pod answered Prometheus (issue 25: every pod that runs
    # a rank is scraped) from its headless server: its build, restarts and state's start.
    loading = [text for text in worker_metrics if "gemmguard_selfcheck_refusals_total" not in text]
    assert loading, "the headless worker's pod never answered /metrics while it ran"
    assert _value(loading[0], "gemmguard_build_info") == 1
    assert 'rank=""' in loading[0] and 'version="' in loading[0]
    assert _value(loading[0], "gemmguard_server_restarts_total") == 0
    created = _value(loading[0], "gemmguard_state_created_timestamp_seconds")
    assert created is not None and 0 < time.time() - created < 600
    assert lingering is not None and lingering.status_code == 200
    assert _value(lingering.text, "gemmguard_selfcheck_refusals_total") == 1
