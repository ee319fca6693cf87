"""benchmarks.runner: what a run is made of, without starting a server (the smoke test does)."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.runner import MAX_CHUNKS, Checkpoint, Options, chunks


@pytest.mark.parametrize("requests, concurrency, sizes", [
    (48, 1, [6] * 8),        # many short A/B chunks at low concurrency
    (48, 4, [8] * 6),        # each chunk at least two waves of 4
    (48, 16, [48]),          # too few requests to split without ramp effects
    (10, 1, [2] * 5),
    (3, 2, [3]),
])
def test_chunks_cover_every_request(requests: int, concurrency: int, sizes: list[int]) -> None:
    found = chunks(requests, concurrency)
    assert sum(found) == requests and len(found) <= MAX_CHUNKS
    assert found == sizes


def test_checkpoints_follow_the_skip_options() -> None:
    assert [c.name for c in Options(skip_fp8=True, skip_large=True).checkpoints()] == [
        "demo-bf16"]
    large = Options(large=(4, 512, 1024)).checkpoints()[-1]
    assert large == Checkpoint("large-fp8-block", "fp8-block", 4, 512, 1024)
    assert large.cli_args(Path("/o"))[:4] == ["--scheme", "fp8-block", "--out", "/o"]


def test_settings_are_json_ready() -> None:
    settings = Options().as_dict()
    assert settings["concurrency"] == [1, 4, 16] and settings["omp_threads_bind"] == "auto"
