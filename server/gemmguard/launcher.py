"""`gemmguard serve`: checks what it can before the engine starts, then runs vLLM's server.

The server runs in a child process (`gemmguard.apiserver`); this process stays as its
supervisor so that it can forward signals, tell the user how to reach the server, and
turn a refusing self-check's report into exit code 3.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmguard import refusal, vllm_adapter
from gemmguard.config import POLICIES, PREFIX, UNCHECKED_POLICIES, settings
from gemmguard.demo.store import DEMO_SERVED_NAME, demo_model_path, ensure_demo_model
from gemmguard.endpoints import PLUGIN_NAME
from gemmguard.errors import ServeError, UsageError
from gemmguard.worker import EXTENSION_CLS

GENERAL_PLUGIN = "gemmguard"
# vLLM's own general plugins; VLLM_PLUGINS is one allowlist for every group, so naming
# only ours would silently switch these off.
VLLM_OWN_PLUGINS = ("lora_filesystem_resolver", "lora_hf_hub_resolver")
# KV cache for the CPU engine, in GiB: vLLM's default reserves far more than a 2-core box has.
CPU_KVCACHE_GIB = "1"
DEFAULT_PORT = 8000


@dataclass
class ServePlan:
    """What `gemmguard serve` will run: the vLLM arguments and the environment."""

    model: str
    vllm_args: list[str]
    env: dict[str, str]
    host: str | None
    port: int
    served_name: str
    demo_scheme: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_demo(self) -> bool:
        return self.demo_scheme is not None

    @property
    def base_url(self) -> str:
        host = self.host if self.host not in (None, "", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gemmguard.apiserver", self.model, *self.vllm_args]


def add_deny_option(parser: argparse.ArgumentParser) -> None:
    """--deny-kernel, shared by every command that starts an engine."""
    parser.add_argument(
        "--deny-kernel",
        action="append",
        default=[],
        metavar="NAME",
        help="Remove the kernel class NAME from every vLLM candidate list (repeatable). "
        "Default: none.",
    )


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """gemmguard's own `serve` options; every other option is passed to vLLM unchanged."""
    parser.add_argument(
        "--demo-scheme",
        choices=("bf16", "fp8-block"),
        default="fp8-block",
        help="Demo checkpoint served when no MODEL is given. Default: fp8-block.",
    )
    add_deny_option(parser)
    parser.add_argument(
        "--selfcheck-policy",
        choices=POLICIES,
        default=None,
        help="What a failing start-up self-check does: warn (serve and alert), fallback "
        "(replace the layer's kernel in place with the fastest passing candidate), fail "
        "(exit 3 with a report). Default: fallback.",
    )
    parser.add_argument(
        "--selfcheck-unchecked",
        choices=UNCHECKED_POLICIES,
        default=None,
        help="What an incomplete self-check (layers it cannot check) does: allow, warn "
        "(serve and report them), fail (exit 3 listing them). Default: warn.",
    )
    parser.add_argument(
        "--canary-interval", type=float, default=None, metavar="SECONDS",
        help="Seconds without a finished request before a 1-token canary is sent. Default: 30.",
    )
    parser.add_argument(
        "--canary-deadline", type=float, default=None, metavar="SECONDS",
        help="Seconds a canary may take before the engine counts as not live. Default: 10.",
    )
    parser.add_argument(
        "--canary-prompt", default=None, metavar="TEXT",
        help="Prompt of the canary generation. Default: 'Hi'.",
    )
    parser.add_argument(
        "--no-canary", action="store_true",
        help="Send no canary; /gemmguard/live then follows real requests only. Default: on.",
    )
    parser.add_argument(
        "--selfcheck-refusal-linger", type=float, default=None, metavar="SECONDS",
        help="Seconds to keep serving /metrics and the self-check report on the server's port "
        "after the self-check refused to serve, before exiting 3. Default: 0.",
    )
    parser.add_argument(
        "--no-per-layer-metrics",
        action="store_true",
        help="Export only per-kernel aggregates, not one series per layer. Default: per layer.",
    )


def _option_value(args: list[str], name: str) -> str | None:
    """Last value of `--name X` or `--name=X` in vLLM's arguments (as vLLM would read it)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _looks_like_path(model: str) -> bool:
    # A Hugging Face id is "org/name"; anything else with slashes is meant as a path.
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def _check_model(model: str) -> None:
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ServeError(
                f"Model directory '{model}' has no config.json, so it is not a Hugging Face "
                "checkpoint. Pass the folder that holds config.json and the weights."
            )
        return
    if _looks_like_path(model):
        raise ServeError(
            f"Model path '{model}' does not exist. Pass an existing checkpoint folder, a "
            "Hugging Face model id, or no MODEL to serve the demo model."
        )


def _check_port(host: str | None, port: int) -> None:
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"Port {port} on {host or 'all interfaces'} is already in use (another "
                    "server?). Stop it, or pass --port with a free port."
                ) from exc
            raise ServeError(f"Cannot listen on {host or '*'}:{port}: {exc.strerror}.") from exc


def plan_serve(argv: list[str], environ: dict[str, str] | None = None) -> ServePlan:
    """Split `gemmguard serve` arguments into gemmguard's options and vLLM's, and check them."""
    parser = argparse.ArgumentParser(prog="gemmguard serve", add_help=False)
    add_serve_options(parser)
    model: str | None = None
    rest = list(argv)
    if rest and not rest[0].startswith("-"):
        model = rest.pop(0)
    opts, vllm_args = parser.parse_known_args(rest)
    if model is None:
        model = _option_value(vllm_args, "--model")
        if model is not None:
            vllm_args = [a for i, a in enumerate(vllm_args) if not _is_model_option(vllm_args, i)]
    if _option_value(vllm_args, "--worker-extension-cls") is not None:
        raise UsageError(
            "--worker-extension-cls is set by gemmguard serve itself (gemmguard's worker "
            "extension gathers the kernel reports); remove it from the command line."
        )

    env = dict(os.environ if environ is None else environ)
    cfg = settings(env)
    is_demo = model is None
    notes: list[str] = []
    if model is None:
        model = str(demo_model_path(cfg.cache_dir, opts.demo_scheme))
        notes.append(f"Serving the {opts.demo_scheme} demo model from {model}.")
    else:
        _check_model(model)

    served_name = _option_value(vllm_args, "--served-model-name")
    if served_name is None:
        served_name = DEMO_SERVED_NAME if is_demo else model
        if is_demo:
            vllm_args += ["--served-model-name", DEMO_SERVED_NAME]

    port_text = _option_value(vllm_args, "--port")
    try:
        port = int(port_text) if port_text is not None else DEFAULT_PORT
    except ValueError as exc:
        raise UsageError(f"--port has value '{port_text}'; it must be an integer.") from exc
    host = _option_value(vllm_args, "--host")
    _check_port(host, port)

    vllm_args += ["--worker-extension-cls", EXTENSION_CLS]
    env = engine_env(env, opts.deny_kernel)
    if opts.no_per_layer_metrics:
        env[PREFIX + "PER_LAYER_METRICS"] = "0"
    if opts.selfcheck_policy:
        env[PREFIX + "SELFCHECK_POLICY"] = opts.selfcheck_policy
    if opts.selfcheck_unchecked:
        env[PREFIX + "SELFCHECK_UNCHECKED"] = opts.selfcheck_unchecked
    for option in ("canary_interval", "canary_deadline", "canary_prompt",
                   "selfcheck_refusal_linger"):
        if getattr(opts, option) is not None:
            env[PREFIX + option.upper()] = str(getattr(opts, option))
    _ = settings(env).selfcheck_refusal_linger  # a bad value fails now, not after a failed start
    if opts.no_canary:
        env[PREFIX + "CANARY_INTERVAL"] = "0"
    demo_scheme = opts.demo_scheme if is_demo else None
    return ServePlan(model, vllm_args, env, host, port, served_name, demo_scheme, notes)


def engine_env(environ: dict[str, str], deny_kernels: list[str]) -> dict[str, str]:
    """The environment every vLLM process of a gemmguard engine needs (server or offline)."""
    env = dict(environ)
    env["VLLM_PLUGINS"] = _plugins_allowlist(env.get("VLLM_PLUGINS", ""))
    if deny_kernels:
        denied = [*settings(env).deny_kernels, *deny_kernels]
        env[PREFIX + "DENY_KERNELS"] = ",".join(dict.fromkeys(denied))
        # vLLM's own switch reaches the choosers gemmguard does not wrap (mixed precision,
        # MXFP4/8, NVFP4); gemmguard's wrapper records the reason "denied" where it does.
        disabled = [n for n in env.get("VLLM_DISABLED_KERNELS", "").split(",") if n]
        env["VLLM_DISABLED_KERNELS"] = ",".join(dict.fromkeys([*disabled, *denied]))
    if vllm_adapter.is_cpu_build() and not env.get("VLLM_CPU_KVCACHE_SPACE"):
        env["VLLM_CPU_KVCACHE_SPACE"] = CPU_KVCACHE_GIB
    return env


def _is_model_option(args: list[str], i: int) -> bool:
    return (
        args[i] == "--model"
        or args[i].startswith("--model=")
        or (i > 0 and args[i - 1] == "--model")
    )


def _plugins_allowlist(current: str) -> str:
    names = [n.strip() for n in current.split(",") if n.strip()]
    if not names:
        names = list(VLLM_OWN_PLUGINS)
    for name in (GENERAL_PLUGIN, PLUGIN_NAME):
        if name not in names:
            names.append(name)
    return ",".join(names)


def _announce_when_ready(plan: ServePlan, child: subprocess.Popen[bytes]) -> None:
    """Print a working curl line once the server answers, so a newcomer can try it."""
    url = plan.base_url + "/gemmguard/ready"
    while child.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    else:
        return
    body = json.dumps({"model": plan.served_name,
                       "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16})
    print(
        f"\ngemmguard: serving '{plan.served_name}' at {plan.base_url}. Try:\n"
        f"  curl -s {plan.base_url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{body}'\n"
        f"  curl -s {plan.base_url}/metrics | grep ^gemmguard_\n",
        flush=True,
    )


def _run_once(plan: ServePlan, env: dict[str, str]) -> int:
    child = subprocess.Popen(plan.command(), env=env)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    threading.Thread(target=_announce_when_ready, args=(plan, child), daemon=True).start()
    return child.wait()


# Exit code when the self-check refuses to serve (see selfcheck.load_check).
EXIT_SELFCHECK_FAILED = 3


def refusal_report(report_file: Path) -> dict[str, Any] | None:
    """The report a refusing engine left (one file per rank), merged; None if none refused."""
    from gemmguard.selfcheck.policy import Outcome

    ranks: list[dict[str, Any]] = []
    policy, unchecked = "fallback", "warn"
    for path in sorted(report_file.parent.glob(report_file.name + ".rank*")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        policy, unchecked = data["policy"], data["unchecked_policy"]
        ranks.extend(data["ranks"])
    return Outcome(policy, ranks, unchecked).as_dict() if ranks else None


def run(plan: ServePlan) -> int:
    """Run the server; exit 3 with the report when the self-check refuses to serve."""
    for note in plan.notes:
        print(f"gemmguard: {note}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gemmguard-") as tmp:
        report_file = Path(tmp) / "selfcheck.json"
        code = _run_once(plan, {**plan.env, PREFIX + "SELFCHECK_REPORT_FILE": str(report_file)})
        report = refusal_report(report_file) if code != 0 else None
        if report is not None:
            print(report["summary"], file=sys.stderr, flush=True)
            # Keep the refusal visible to Prometheus and the probes for a while (chart option).
            refusal.linger(report, plan.host, plan.port, settings(plan.env))
            return EXIT_SELFCHECK_FAILED
    return code


def serve(argv: list[str]) -> int:
    """`gemmguard serve [MODEL] [options]`: plan, prepare the demo if needed, and run."""
    plan = plan_serve(argv)
    if plan.demo_scheme is not None:
        ensure_demo_model(Path(plan.model), plan.demo_scheme)
    return run(plan)
