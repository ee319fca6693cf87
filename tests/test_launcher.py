"""`gemmguard serve`'s supervisor: no vLLM in it, and pre-flight errors end with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import busy_port, free_port
from gemmguard.demo import write_demo_model


def _env(tmp_path: Path) -> dict[str, str]:
    return {"GEMMGUARD_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}


def _serve(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gemmguard.cli", "serve", *args],
        capture_output=True, text=True, timeout=300,
        env=_env(tmp_path),
    )


def test_cli_wrong_model_path_ends_with_one_line(tmp_path: Path) -> None:
    result = _serve([str(tmp_path / "missing-model")], tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("gemmguard serve: error: Model path")


def test_cli_port_in_use_ends_with_one_line(tmp_path: Path) -> None:
    with busy_port() as port:
        result = _serve(["--host", "127.0.0.1", "--port", str(port)], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("pass --port with a free port.")
    assert result.stderr.count("\n") == 1


def test_cli_unsupported_option_ends_with_one_line(tmp_path: Path) -> None:
    model = write_demo_model(tmp_path / "m")
    result = _serve([str(model), "--port", str(free_port()), "--no-such-option", "1"], tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        line for line in errors if line.startswith("gemmguard serve: error: unrecognized arguments")
    ]
    assert len(errors) == 1 and "--no-such-option" in errors[0]


def test_the_supervisor_imports_neither_vllm_nor_torch(tmp_path: Path) -> None:
    # The server process reads vLLM's options and refuses the busy port; the supervisor
    # only passes its exit code on. Importing vLLM here too cost every start ~20 s.
    with busy_port() as port:
        probe = (
            "import sys; from gemmguard.cli import main; "
            f"code = main(['serve', '--host', '127.0.0.1', '--port', '{port}']); "
            "print(code, sorted(m for m in ('vllm', 'torch') if m in sys.modules))"
        )
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                timeout=300, env=_env(tmp_path))
    assert result.stdout.strip().splitlines()[-1] == "2 []", result.stderr
    assert "already in use" in result.stderr


def test_a_refusal_report_takes_each_rank_once_from_every_ranks_file(tmp_path: Path) -> None:
    """Every rank of a refusing engine leaves a file holding the whole engine's report (the
    ranks learn each other's at load): merged, each rank counts once."""
    import json

    from gemmguard.launcher import refusal_report
    from gemmguard.selfcheck.policy import Outcome
    from test_refusal import REPORT

    refusing = REPORT["ranks"][0]
    passing = {**refusing, "rank": 1, "refusal": "",
               "layers": [row for row in refusing["layers"] if row["verdict"] == "pass"]}
    whole = Outcome("fail", [refusing, passing]).as_dict()
    report_file = tmp_path / "selfcheck.json"
    for rank in (0, 1):
        Path(f"{report_file}.rank{rank}").write_text(json.dumps(whole))
    merged = refusal_report(report_file)
    assert merged is not None
    assert [rank["rank"] for rank in merged["ranks"]] == [0, 1]
    assert merged["refusal"] == refusing["refusal"] and merged["counts"] == whole["counts"]
    assert refusal_report(tmp_path / "none.json") is None
