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


def test_the_model_a_config_file_names_is_the_one_served(tmp_path: Path) -> None:
    from gemmguard import vllm_adapter
    from gemmguard.vllm_adapter.serve_args import configured_model, serve_parser

    named = tmp_path / "named.yaml"
    named.write_text("model: org/from-config\n")
    assert configured_model(["--config", str(named)]) == "org/from-config"
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text("max_model_len: 256\n")
    assert configured_model(["--config", str(unnamed)]) is None  # vLLM: "No model specified!"
    parser, serve = serve_parser(vllm_adapter.flexible_argument_parser())
    assert serve is not None and parser.parse_args(["serve", "org/m"]).model_tag == "org/m"
