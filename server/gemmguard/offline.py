"""An engine without a server, for `gemmguard kernels` and `gemmguard selfcheck`.

Same plugins, worker extension and settings as `gemmguard serve`, built from the same
vLLM options, so what it reports is what the server would run.
"""

from __future__ import annotations

import os
from typing import Any

from gemmguard import vllm_adapter
from gemmguard.serve_plan import check_model, engine_env
from gemmguard.worker import EXTENSION_CLS


def start_engine(model: str, vllm_argv: list[str], deny_kernels: list[str]) -> Any:
    """A vLLM engine for `model` with gemmguard's plugins; vLLM options as on `serve`."""
    check_model(model)
    # Engine processes inherit this environment: plugins and settings must be set first.
    os.environ.update(engine_env(dict(os.environ), deny_kernels))
    # vLLM logs to stdout by default; keep stdout for the table or JSON this command prints.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    args = vllm_adapter.engine_args(
        ["--model", model, *vllm_argv, "--worker-extension-cls", EXTENSION_CLS])
    return vllm_adapter.offline_engine(args)


def format_kernel_table(ranks: list[list[dict[str, Any]]]) -> str:
    """The kernel report as a terminal table, one line per layer and turned-down candidate."""
    header = ("rank", "layer", "type", "scheme", "kernel")
    lines = [header]
    turned_down: dict[tuple[str, str], int] = {}
    for rows in ranks:
        for row in rows:
            lines.append((str(row.get("rank", 0)), row["layer"], row["layer_type"],
                          row["scheme"], row["kernel"]))
            for attempt in row["turned_down"]:
                key = (attempt["kernel"], attempt["reason"])
                turned_down[key] = turned_down.get(key, 0) + 1
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in lines]
    if turned_down:
        table += ["", "Candidates vLLM turned down:"]
        table += [f"  {kernel} ({count} layers): {reason}"
                  for (kernel, reason), count in turned_down.items()]
    return "\n".join(table)
