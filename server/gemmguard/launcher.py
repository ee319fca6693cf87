"""`gemmguard serve`: the supervisor of the server process, which runs vLLM's own server.

The server process (`gemmguard.apiserver`) plans, checks and serves (`serve_plan`). This
process stays beside it to forward signals, tell the user how to reach the server, and
turn a refusing self-check's report into exit code 3 after lingering on the port with it.
It imports neither vLLM nor torch: before the server process starts there is only
Python's own start-up, so `gemmguard serve` reaches vLLM's first line as `vllm serve` does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gemmguard.config import PREFIX, settings

# Exit code when the self-check refuses to serve (policy.EXIT_REFUSED, not imported here:
# the policy module brings torch).
EXIT_SELFCHECK_FAILED = 3


def server_command(argv: list[str]) -> list[str]:
    """The server process: `gemmguard serve`'s arguments, all of them, go to it."""
    return [sys.executable, "-m", "gemmguard.apiserver", *argv]


def read_plan(plan_file: Path) -> dict[str, Any] | None:
    """What the server process planned (`ServePlan.handoff`), once it has; else None."""
    try:
        plan: dict[str, Any] = json.loads(plan_file.read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return None
    return plan


def _announce_when_ready(plan_file: Path, child: subprocess.Popen[bytes]) -> None:
    """Print a working curl line once the server answers, so a newcomer can try it."""
    while child.poll() is None:
        plan = read_plan(plan_file)
        if plan is not None:
            try:
                url = plan["base_url"] + "/gemmguard/ready"
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(1)
    else:
        return
    base_url, name = plan["base_url"], plan["served_name"]
    body = json.dumps({"model": name,
                       "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16})
    print(
        f"\ngemmguard: serving '{name}' at {base_url}. Try:\n"
        f"  curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{body}'\n"
        f"  curl -s {base_url}/metrics | grep ^gemmguard_\n",
        flush=True,
    )


def _run_once(argv: list[str], env: dict[str, str], plan_file: Path) -> int:
    child = subprocess.Popen(server_command(argv), env=env)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    threading.Thread(target=_announce_when_ready, args=(plan_file, child), daemon=True).start()
    return child.wait()


def refusal_report(report_file: Path) -> dict[str, Any] | None:
    """The report a refusing engine left (one file per rank), merged; None if none refused.

    Each refusing rank's file holds every rank of its engine (they learn each other's reports
    at load), so a rank is taken once.
    """
    ranks: dict[tuple[Any, Any], dict[str, Any]] = {}
    policy, unchecked = "fallback", "warn"
    for path in sorted(report_file.parent.glob(report_file.name + ".rank*")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        policy, unchecked = data["policy"], data["unchecked_policy"]
        for rank in data["ranks"]:
            ranks.setdefault((rank.get("data_parallel_rank"), rank.get("rank")), rank)
    if not ranks:
        return None
    from gemmguard.selfcheck.policy import Outcome  # brings torch: only once a rank refused

    return Outcome(policy, list(ranks.values()), unchecked).as_dict()


def serve(argv: list[str], environ: dict[str, str] | None = None) -> int:
    """`gemmguard serve [MODEL] [options]`: run the server process; exit 3 when it refused."""
    env = dict(os.environ if environ is None else environ)
    with tempfile.TemporaryDirectory(prefix="gemmguard-") as tmp:
        report_file, plan_file = Path(tmp) / "selfcheck.json", Path(tmp) / "plan.json"
        code = _run_once(argv, {**env, PREFIX + "SELFCHECK_REPORT_FILE": str(report_file),
                                PREFIX + "SERVE_PLAN_FILE": str(plan_file)}, plan_file)
        report = refusal_report(report_file) if code != 0 else None
        plan = read_plan(plan_file)
        if report is not None:
            from gemmguard import refusal

            print(report["summary"], file=sys.stderr, flush=True)
            if plan is not None:  # keep the refusal visible to Prometheus and the probes
                refusal.linger(report, plan["host"], plan["port"], settings(plan["env"]))
            return EXIT_SELFCHECK_FAILED
    return code
