"""Eval configs: one YAML per model × hardware, loaded into frozen dataclasses and checked strictly.

A config says which model and serving options it is for, which lm-eval tasks to run, the figure
each metric must reach, the tolerance, and where that figure comes from. `evals/schema.json` is
the one statement of what a config may hold: every config is validated against it with
`jsonschema`, so unknown keys are errors and a misspelt key cannot fall back to a default.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gemmguard.errors import UsageError

# The repository's evals/ (configs, tasks, data and the schema): server/gemmguard/evaluation/…
SCHEMA_FILE = Path(__file__).resolve().parents[3] / "evals" / "schema.json"


@functools.cache
def schema() -> dict[str, Any]:
    """evals/schema.json, the definition of a valid eval config."""
    try:
        loaded: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    except OSError as exc:
        raise UsageError(
            f"Cannot read the eval config schema {SCHEMA_FILE}: {exc.strerror}. Evals run from "
            "a gemmguard checkout (pip install -e '.[eval]'), where evals/schema.json is "
            "checked in."
        ) from exc
    return loaded


def _enum(*keys: str) -> tuple[str, ...]:
    node: Any = schema()
    for key in keys:
        node = node[key]
    return tuple(node["enum"])


# The fleet's hardware targets: the same names as images/<target>/ and the chart's profiles.
HARDWARE_TARGETS = _enum("properties", "hardware")
# measured: run with this config, see measured_with. upstream: a figure someone else published,
# maybe with another harness. placeholder: no measurement yet; a verdict on it is provisional.
SOURCE_KINDS = _enum("properties", "source", "properties", "kind")


@dataclass(frozen=True)
class MetricExpectation:
    """The figure one lm-eval metric must reach (before the tolerance is applied)."""

    name: str
    value: float


@dataclass(frozen=True)
class TaskExpectation:
    """One lm-eval task and the metrics it is judged on."""

    name: str
    metrics: tuple[MetricExpectation, ...]


@dataclass(frozen=True)
class Source:
    """Where the expected figures come from."""

    kind: str
    reference: str


@dataclass(frozen=True)
class MeasuredWith:
    """What a measured baseline was produced on."""

    vllm: str
    hardware: str
    date: str
    gemmguard: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    """One model × hardware eval: what to run, what to expect, and how far below is still a pass."""

    model_name: str
    hardware: str
    tasks: tuple[TaskExpectation, ...]
    rtol: float
    num_fewshot: int
    source: Source
    limit: int | None = None
    measured_with: MeasuredWith | None = None
    apply_chat_template: bool = False
    max_model_len: int | None = None
    vllm_args: tuple[str, ...] = ()
    env_vars: Mapping[str, str] = field(default_factory=dict)
    gen_kwargs: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    @property
    def stem(self) -> str:
        """The config's file name without .yaml (its id in lists and test names)."""
        return self.path.stem if self.path is not None else self.model_name.replace("/", "_")

    def threshold(self, metric: MetricExpectation) -> float:
        """The lowest passing value: measured >= value * (1 - rtol)."""
        return metric.value * (1.0 - self.rtol)


def _where(path: Any) -> str:
    """A JSON path as a reader writes it: tasks[0].metrics[1].name."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "the top level"


def _hint(error: Any) -> str:
    """What to do about one schema violation."""
    node = error.schema
    if error.validator == "additionalProperties":
        return f"; allowed keys: {', '.join(sorted(node.get('properties', {})))}"
    if error.validator == "type" and "string" in str(node.get("type")):
        return " (quote numbers in YAML)"
    description = node.get("description") if error.path else None  # not the whole schema's
    return f" ({description})" if description else ""


def _normalise(data: object) -> object:
    """YAML reads an unquoted 2026-11-24 as a date; the schema wants its ISO text."""
    if isinstance(data, Mapping) and isinstance(data.get("measured_with"), Mapping):
        measured = dict(data["measured_with"])
        if isinstance(measured.get("date"), datetime.date):
            measured["date"] = measured["date"].isoformat()
        return {**data, "measured_with": measured}
    return data


def validate(data: object, source: str = "<config>") -> None:
    """Check `data` against evals/schema.json; UsageError naming the file, path and rule."""
    import jsonschema  # the eval extra's; imported here so serving never needs it

    validator = jsonschema.Draft7Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.path])
    if errors:
        lines = [f"{_where(e.path)}: {e.message}{_hint(e)}" for e in errors]
        raise UsageError(
            f"Eval config {source} does not match evals/schema.json: " + "; ".join(lines)
            + ". Fix the config (evals/schema.json describes every key)."
        )


def parse_config(data: object, source: str = "<config>", path: Path | None = None) -> EvalConfig:
    """Validate a config mapping and turn it into an EvalConfig; UsageError names the fault."""
    data = _normalise(data)
    validate(data, source)
    assert isinstance(data, Mapping)  # validated: the schema's top level is an object
    tasks = tuple(
        TaskExpectation(t["name"], tuple(MetricExpectation(m["name"], float(m["value"]))
                                         for m in t["metrics"]))
        for t in data["tasks"]
    )
    for i, task in enumerate(tasks):  # the one rule JSON Schema cannot say: unique names
        names = [m.name for m in task.metrics]
        if len(set(names)) != len(names):
            raise UsageError(f"Eval config {source}: tasks[{i}].metrics: metric names repeat: "
                             f"{names}. Give each metric once.")
    measured = data.get("measured_with")
    return EvalConfig(
        model_name=data["model_name"],
        hardware=data["hardware"],
        tasks=tasks,
        rtol=float(data["rtol"]),
        num_fewshot=data["num_fewshot"],
        source=Source(data["source"]["kind"], data["source"]["reference"]),
        limit=data.get("limit"),
        measured_with=None if measured is None else MeasuredWith(
            measured["vllm"], measured["hardware"], measured["date"], measured.get("gemmguard")),
        apply_chat_template=data.get("apply_chat_template", False),
        max_model_len=data.get("max_model_len"),
        vllm_args=tuple(data.get("vllm_args", ())),
        env_vars=dict(data.get("env_vars", {})),
        gen_kwargs=dict(data.get("gen_kwargs", {})),
        path=path,
    )


def load_config(path: Path | str) -> EvalConfig:
    """Read and check one eval config YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(
            f"Cannot read eval config '{path}': {exc.strerror}. Pass a file from evals/, "
            "e.g. evals/demo-cpu.yaml."
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"Eval config {path} is not valid YAML: {exc}") from exc
    return parse_config(data, str(path), path)


def load_list(path: Path | str) -> tuple[Path, ...]:
    """Config paths named in a tier list (evals/lists/<tier>.txt), relative to evals/."""
    path = Path(path)
    evals_dir = path.resolve().parent.parent
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        config = evals_dir / name
        if not config.is_file():
            raise UsageError(
                f"{path}:{number} names '{name}', which is not a file in {evals_dir}. "
                "Fix the name or add the config."
            )
        entries.append(config)
    return tuple(entries)
