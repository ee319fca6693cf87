"""vllm_adapter.serve_args against the installed vLLM: config files and both spellings."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemmguard.errors import UsageError
from gemmguard.vllm_adapter.serve_args import parse_serve_args


def test_config_file_and_underscore_spellings_are_resolved(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9123\nmax_model_len: 256\nhost: 127.0.0.2\n")
    args = parse_serve_args(["org/model", "--config", str(config), "--max_model_len", "512"])
    assert (args.port, args.host, args.max_model_len) == (9123, "127.0.0.2", 512)  # CLI wins
    assert args.served_model_name is None and not args.worker_extension_cls


def test_an_unknown_option_is_a_usage_error_naming_it() -> None:
    with pytest.raises(UsageError, match=r"unrecognized arguments: --no-such-option"):
        parse_serve_args(["org/model", "--no-such-option", "1"])


def test_a_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"vLLM cannot read these options: .*missing.yaml"):
        parse_serve_args(["org/model", "--config", str(tmp_path / "missing.yaml")])
