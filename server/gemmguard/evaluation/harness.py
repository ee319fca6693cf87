"""Runs lm-eval against a running server's OpenAI API, offline, with the config's settings."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemmguard.errors import UsageError
from gemmguard.evaluation.config import EvalConfig
from gemmguard.evaluation.tasks import render_tasks

# Data comes from evals/data; the hub is never needed, and a run must not quietly fetch from it.
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
INSTALL_HINT = "pip install 'gemmguard[eval]'"


@dataclass(frozen=True)
class HarnessRun:
    """What was asked of lm-eval, and what it returned."""

    model_type: str
    model_args: dict[str, Any]
    limit: int | None
    results: dict[str, Any]


def go_offline() -> None:
    """Forbid Hugging Face hub access for this process; call before lm-eval or datasets loads."""
    os.environ.update(OFFLINE_ENV)


def _import_lm_eval() -> Any:
    go_offline()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UsageError(
            f"lm-eval is not installed ({exc.name} is missing); install it with: {INSTALL_HINT}"
        ) from exc
    return lm_eval, TaskManager


def model_settings(
    config: EvalConfig, base_url: str, model: str, concurrency: int, timeout_s: int
) -> tuple[str, dict[str, Any]]:
    """lm-eval's model type and model_args for the server at `base_url` (no /v1)."""
    if config.apply_chat_template:
        model_type, endpoint = "local-chat-completions", "/v1/chat/completions"
    else:
        model_type, endpoint = "local-completions", "/v1/completions"
    args: dict[str, Any] = {
        "model": model,
        "base_url": base_url + endpoint,
        # The server tokenizes; no tokenizer is downloaded or needed here.
        "tokenizer_backend": None,
        "tokenized_requests": False,
        "num_concurrent": concurrency,
        "max_retries": 3,
        "timeout": timeout_s,
    }
    if config.max_model_len is not None:
        args["max_length"] = config.max_model_len
    return model_type, args


def run_harness(
    config: EvalConfig,
    tasks_dir: Path,
    base_url: str,
    model: str,
    limit: int | None,
    concurrency: int = 8,
    timeout_s: int = 600,
) -> HarnessRun:
    """Run every task of `config` with lm-eval; return lm-eval's results dict (samples included)."""
    lm_eval, task_manager_cls = _import_lm_eval()
    model_type, model_args = model_settings(config, base_url, model, concurrency, timeout_s)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="gemmguard-tasks-") as scratch:
        names = render_tasks((t.name for t in config.tasks), tasks_dir, Path(scratch))
        # include_defaults=False: only our offline tasks exist, so a typo cannot reach the hub.
        manager = task_manager_cls(include_path=scratch, include_defaults=False)
        results = lm_eval.simple_evaluate(
            model=model_type,
            model_args=model_args,
            tasks=names,
            num_fewshot=config.num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=True,
            apply_chat_template=config.apply_chat_template,
            fewshot_as_multiturn=config.apply_chat_template,
            gen_kwargs=dict(config.gen_kwargs) or None,
            verbosity="WARNING",
        )
    if not results:
        raise UsageError("lm-eval returned no results; its log above says why.")
    return HarnessRun(model_type, model_args, limit, dict(results))
