"""What loading vLLM's general plugins costs before vLLM's first log line (issue 24).

vLLM loads its general plugins while it builds its argument parser, in the API server process,
before it prints anything. This times that step in fresh processes, alternating arms: plain
(`VLLM_PLUGINS=none`) twice, as the A/A; with gemmguard's plugin as any vLLM process loads it
(`gemmguard`); and as the API server process of `gemmguard serve` loads it (`gemmguard-api`:
`plugin.defer()` first, as `gemmguard.apiserver` does).

    python -m benchmarks.parser_plugins --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

# Run in a fresh process: vLLM's serve command imported first (as `vllm serve` does), then only
# the parser build is timed.
PROBE = """
import sys, time
if sys.argv[1] == "defer":
    from gemmguard import plugin
    plugin.defer()
import vllm.entrypoints.cli.serve
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
start = time.perf_counter()
AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
print(time.perf_counter() - start, "gemmguard.config" in sys.modules)  # register() ran
"""
ARMS = {"plain-a": ("none", False), "gemmguard": ("gemmguard", False),
        "gemmguard-api": ("gemmguard", True), "plain-b": ("none", False)}


def one(plugins: str, defer: bool = False) -> float:
    """Seconds to build vLLM's parser with VLLM_PLUGINS=`plugins`, in a fresh process."""
    env = {**os.environ, "VLLM_PLUGINS": plugins}
    done = subprocess.run([sys.executable, "-c", PROBE, "defer" if defer else "full"], env=env,
                          capture_output=True, text=True, check=True)
    seconds, loaded = done.stdout.strip().splitlines()[-1].split()
    if (loaded == "True") != (plugins == "gemmguard"):  # else the arms measure the same thing
        raise RuntimeError(f"VLLM_PLUGINS={plugins}: gemmguard's plugin loaded: {loaded}. "
                           "Install gemmguard (`make install-dev`) so vLLM finds its entry point.")
    return float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    names = list(ARMS)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:  # the order rotated every round
            seconds[name].append(one(*ARMS[name]))
    for name in names:
        values = seconds[name]
        print(f"{name}: median {statistics.median(values):.3f} s "
              f"({min(values):.3f}-{max(values):.3f}) over {rounds} runs")
    plain = [(a + b) / 2 for a, b in zip(seconds["plain-a"], seconds["plain-b"], strict=True)]
    aa = [a - b for a, b in zip(seconds["plain-a"], seconds["plain-b"], strict=True)]
    print(f"A/A plain-a - plain-b: median {statistics.median(aa):+.3f} s "
          f"({min(aa):+.3f}..{max(aa):+.3f})")
    for name in ("gemmguard", "gemmguard-api"):
        extra = [g - p for g, p in zip(seconds[name], plain, strict=True)]
        print(f"{name} - mean(plain): median {statistics.median(extra):+.3f} s "
              f"({min(extra):+.3f}..{max(extra):+.3f})")


if __name__ == "__main__":
    main()
