"""benchmarks.cli: options, the exit status, and re-rendering from JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from benchmarks import cli, report
from benchmarks.runner import Options


def parse(*argv: str) -> Options:
    return cli.options_from(cli.build_parser().parse_args(list(argv)))


def test_tiny_counts_for_a_smoke_run() -> None:
    options = parse("--requests", "8", "--concurrency", "1,2", "--rounds", "1", "--skip-large",
                    "--skip-fp8", "--startup-rounds", "0", "--engine-args",
                    "--enforce-eager --max-model-len 512")
    assert options.concurrency == (1, 2) and options.requests == 8
    assert options.engine_args == ("--enforce-eager", "--max-model-len", "512")
    assert [c.name for c in options.checkpoints()] == ["demo-bf16"]


def test_defaults_include_large_and_fp8_checkpoints() -> None:
    names = [c.name for c in parse().checkpoints()]
    assert names == ["demo-bf16", "demo-fp8-block", "large-bf16", "large-fp8-block"]
    large = parse("--large", "4,512,1024").checkpoints()[2]
    assert large.cli_args(Path("/o"))[-6:] == ["--layers", "4", "--hidden-size", "512",
                                               "--intermediate-size", "1024"]


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "1,x"], "'1,x' is not a comma-separated list of integers"),
    (["--concurrency", "0"], "'0' must list positive integers"),
    (["--requests", "2,3"], "'2,3' must be one positive integer"),
    (["--startup-rounds", "-1"], "'-1' must be 0 or more"),
])
def test_bad_options_are_named_with_their_value(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def fake_run(problems: list[dict[str, str]], held: bool) -> Any:
    def run(options: Options, workdir: Path, log: Any) -> dict[str, Any]:
        return {"request_path": None, "startup": None, "memory": None, "kernels": None,
                "load_held": {"held": held, "servers": {}, "errors": {}},
                "problems": problems}
    return run


@pytest.mark.parametrize("problems, held, status", [
    ([], True, 0),
    ([{"section": "start-up", "error": "boom"}], True, 1),
    ([], False, 1),
])
def test_exit_status_is_1_when_a_section_failed_or_a_request_was_lost(
        problems: list[dict[str, str]], held: bool, status: int, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "run", fake_run(problems, held))
    assert cli.main(["--out", str(tmp_path), "--workdir", str(tmp_path / "w")]) == status
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert data["command"] == f"python -m benchmarks --out {tmp_path} --workdir {tmp_path / 'w'}"
    assert data["versions"]["gemmguard"] and data["machine"]["usable_cpus"]
    assert "gemmguard benchmark summary" in capsys.readouterr().out


def test_render_rederives_and_rewrites_both_files(tmp_path: Path) -> None:
    source = tmp_path / "in" / report.JSON_NAME
    source.parent.mkdir()
    source.write_text(json.dumps({"command": "python -m benchmarks --out docs",
                                  "problems": []}))
    assert cli.main(["--render", str(source), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / report.MARKDOWN_NAME).read_text()
    assert "python -m benchmarks --out docs" in text
    data = json.loads((tmp_path / "out" / report.JSON_NAME).read_text())
    assert data["memory"] == {"rows": []} and data["load_held"] is None
