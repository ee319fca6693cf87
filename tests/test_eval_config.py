"""Eval configs: shipped ones load and validate; broken ones are rejected by loader and schema."""

from __future__ import annotations

import copy
import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gemmguard.errors import UsageError
from gemmguard.evaluation.config import (
    HARDWARE_TARGETS,
    SOURCE_KINDS,
    EvalConfig,
    load_config,
    load_list,
    parse_config,
)
from gemmguard.evaluation.tasks import available_tasks

EVALS = Path(__file__).resolve().parent.parent / "evals"
CONFIGS = sorted(EVALS.glob("*.yaml"))
SCHEMA = json.loads((EVALS / "schema.json").read_text())

VALID: dict[str, Any] = {
    "model_name": "org/model",
    "hardware": "cuda-blackwell",
    "tasks": [{"name": "gsm8k_local", "metrics": [{"name": "exact_match,strict-match",
                                                   "value": 0.81}]}],
    "rtol": 0.05,
    "num_fewshot": 5,
    "source": {"kind": "upstream", "reference": "somewhere"},
}


def _schema_errors(data: object) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [e.message for e in validator.iter_errors(data)]


def test_schema_is_a_valid_draft7_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads_and_matches_the_schema(path: Path) -> None:
    config = load_config(path)
    assert config.path == path and config.stem == path.stem
    assert _schema_errors(yaml.safe_load(path.read_text())) == []
    assert config.tasks and all(t.metrics for t in config.tasks)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_opens_with_the_command_that_gives_its_figure(path: Path) -> None:
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ")
    assert f"gemmguard eval evals/{path.name}" in first_line


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_names_only_local_tasks(path: Path) -> None:
    known = available_tasks(EVALS / "tasks")
    assert {t.name for t in load_config(path).tasks} <= set(known)


def test_every_config_is_in_a_tier_list_and_every_list_entry_exists() -> None:
    listed = [p for lst in sorted((EVALS / "lists").glob("*.txt")) for p in load_list(lst)]
    assert sorted(listed) == sorted(p.resolve() for p in CONFIGS)


def test_list_naming_a_missing_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "nightly.txt"
    lst.write_text("# comment\nnot-there.yaml\n")
    with pytest.raises(UsageError, match=r"nightly.txt:2 names 'not-there.yaml'"):
        load_list(lst)


def test_schema_and_loader_agree_on_keys_and_targets() -> None:
    assert tuple(SCHEMA["properties"]["hardware"]["enum"]) == HARDWARE_TARGETS
    source_kinds = SCHEMA["properties"]["source"]["properties"]["kind"]["enum"]
    assert tuple(source_kinds) == SOURCE_KINDS
    loader_fields = [f for f in fields(EvalConfig) if f.name != "path"]
    assert set(SCHEMA["properties"]) == {f.name for f in loader_fields}
    assert set(SCHEMA["required"]) == {
        f.name for f in loader_fields if f.default is MISSING and f.default_factory is MISSING
    }


def test_valid_config_parses_into_a_frozen_dataclass() -> None:
    config = parse_config(VALID)
    assert config.rtol == 0.05 and config.hardware == "cuda-blackwell"
    assert config.tasks[0].metrics[0].value == 0.81
    assert config.threshold(config.tasks[0].metrics[0]) == pytest.approx(0.81 * 0.95)
    with pytest.raises(AttributeError):
        config.rtol = 0.5  # type: ignore[misc]
    assert _schema_errors(VALID) == []


def _without(key: str) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    del data[key]
    return data


def _with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    data.update(changes)
    return data


BROKEN = {
    "missing rtol": (_without("rtol"), r"the top level: 'rtol' is a required property"),
    "unknown hardware": (_with(hardware="cuda-hopper"),
                         r"hardware: 'cuda-hopper' is not one of \['cuda-blackwell'"),
    "typo in a key": (_with(num_fewshots=5),
                      r"\('num_fewshots' was unexpected\); allowed keys: apply_chat_template"),
    "env instead of env_vars": (_with(env={"A": "1"}), r"\('env' was unexpected\)"),
    "rtol of 1 or more": (_with(rtol=1.0),
                          r"rtol: 1.0 is greater than or equal to the maximum of 1"),
    "rtol as text": (_with(rtol="5%"), r"rtol: '5%' is not of type 'number'"),
    "metric without a filter": (
        _with(tasks=[{"name": "gsm8k_local", "metrics": [{"name": "exact_match", "value": 0.8}]}]),
        r"tasks\[0\].metrics\[0\].name: 'exact_match' does not match .*'<metric>,<filter>'",
    ),
    "score above 1": (
        _with(tasks=[{"name": "t", "metrics": [{"name": "acc,none", "value": 81}]}]),
        r"tasks\[0\].metrics\[0\].value: 81 is greater than the maximum of 1",
    ),
    "no tasks": (_with(tasks=[]), r"tasks: \[\] should be non-empty"),
    "measured without measured_with": (
        _with(source={"kind": "measured", "reference": "x"}),
        r"the top level: 'measured_with' is a required property",
    ),
    "unknown source kind": (_with(source={"kind": "guess", "reference": "x"}),
                            r"source.kind: 'guess' is not one of \['measured'"),
    "unquoted number in vllm_args": (_with(vllm_args=["--tensor-parallel-size", 2]),
                                     r"vllm_args\[1\]: 2 is not of type 'string' \(quote numbers"),
}


@pytest.mark.parametrize("data,message", BROKEN.values(), ids=list(BROKEN))
def test_loader_rejects_broken_config(data: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_config(data, "evals/broken.yaml")


@pytest.mark.parametrize("data,message", BROKEN.values(), ids=list(BROKEN))
def test_schema_rejects_broken_config(data: dict[str, Any], message: str) -> None:
    assert _schema_errors(data) != []


def test_loader_names_the_file_in_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "m-cpu.yaml"
    path.write_text(yaml.safe_dump(_without("rtol")))
    with pytest.raises(UsageError, match=rf"Eval config {path} does not match evals/schema.json: "
                       r"the top level: 'rtol' is a required property"):
        load_config(path)


def test_missing_file_and_bad_yaml_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"Cannot read eval config .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name: [unclosed\n")
    with pytest.raises(UsageError, match=r"is not valid YAML"):
        load_config(bad)


def test_measured_with_accepts_an_unquoted_yaml_date() -> None:
    data = _with(source={"kind": "measured", "reference": "line 1"},
                 measured_with={"vllm": "0.33.0", "hardware": "8x B200", "date": "2026-11-24"})
    parsed = yaml.safe_load(yaml.safe_dump(data).replace("'2026-11-24'", "2026-11-24"))
    config = parse_config(parsed)
    assert config.measured_with is not None and config.measured_with.date == "2026-11-24"


def test_repeated_metric_names_are_rejected() -> None:
    metric = {"name": "acc,none", "value": 0.5}
    with pytest.raises(UsageError, match=r"tasks\[0\].metrics: metric names repeat"):
        parse_config(_with(tasks=[{"name": "t", "metrics": [metric, metric]}]), "evals/x.yaml")


def test_the_loader_reads_its_rules_from_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    from gemmguard.evaluation import config as config_module

    stricter = copy.deepcopy(SCHEMA)
    stricter["properties"]["rtol"]["maximum"] = 0.01
    monkeypatch.setattr(config_module, "schema", lambda: stricter)
    with pytest.raises(UsageError, match=r"rtol: 0.05 is greater than the maximum of 0.01"):
        parse_config(VALID)
