"""Eval configs: one YAML per model × hardware, loaded into frozen dataclasses and checked strictly.

A config says which model and serving options it is for, which lm-eval tasks to run, the figure
each metric must reach, the tolerance, and where that figure comes from. Unknown keys are errors,
so a misspelt key cannot silently fall back to a default.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

from gemmguard.errors import UsageError

# The fleet's hardware targets: the same names as images/<target>/ and the chart's profiles.
HARDWARE_TARGETS = ("cuda-blackwell", "cuda-ampere", "rocm-gfx950", "cpu")
# measured: run with this config, see measured_with. upstream: a figure someone else published,
# maybe with another harness. placeholder: no measurement yet; a verdict on it is provisional.
SOURCE_KINDS = ("measured", "upstream", "placeholder")
# lm-eval reports metrics as "<metric>,<filter>", e.g. "exact_match,strict-match".
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_]+,[A-Za-z0-9_.-]+$")
_TASK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


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


class _Reader:
    """Reads one mapping of a config file, naming the file and key in every error."""

    def __init__(self, source: str, where: str, data: object) -> None:
        self.source = source
        self.where = where
        if not isinstance(data, Mapping):
            self.fail(f"must be a mapping, got {type(data).__name__} {data!r}")
        self.data: Mapping[str, Any] = data

    def fail(self, message: str) -> NoReturn:
        raise UsageError(f"Eval config {self.source}: {self.where}{message}.")

    def check_keys(self, required: set[str], optional: set[str]) -> None:
        unknown = sorted(set(self.data) - required - optional)
        if unknown:
            allowed = ", ".join(sorted(required | optional))
            self.fail(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {allowed}")
        missing = sorted(required - set(self.data))
        if missing:
            self.fail(f"missing required key(s) {', '.join(map(repr, missing))}")

    def string(self, key: str) -> str:
        value = self.data[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(f"'{key}' has value {value!r}; it must be a non-empty string")
        return str(value)

    def number(self, key: str) -> float:
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"'{key}' has value {value!r}; it must be a number")
        return float(value)

    def integer(self, key: str, minimum: int) -> int:
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(f"'{key}' has value {value!r}; it must be an integer >= {minimum}")
        return int(value)

    def flag(self, key: str) -> bool:
        value = self.data[key]
        if not isinstance(value, bool):
            self.fail(f"'{key}' has value {value!r}; it must be true or false")
        return bool(value)

    def child(self, key: str, data: object) -> _Reader:
        return _Reader(self.source, f"{self.where}{key}: ", data)


def _metric(reader: _Reader) -> MetricExpectation:
    reader.check_keys({"name", "value"}, set())
    name = reader.string("name")
    if not _METRIC_NAME.match(name):
        reader.fail(
            f"metric name '{name}' is not lm-eval's '<metric>,<filter>' form "
            "(e.g. 'exact_match,strict-match')"
        )
    value = reader.number("value")
    if not 0.0 <= value <= 1.0:
        reader.fail(f"'value' is {value}; expected a score between 0 and 1")
    return MetricExpectation(name, value)


def _task(reader: _Reader) -> TaskExpectation:
    reader.check_keys({"name", "metrics"}, set())
    name = reader.string("name")
    if not _TASK_NAME.match(name):
        reader.fail(f"task name '{name}' may hold only letters, digits, '_', '.' and '-'")
    metrics = reader.data["metrics"]
    if not isinstance(metrics, list) or not metrics:
        reader.fail("'metrics' must be a non-empty list of {name, value}")
    parsed = tuple(_metric(reader.child(f"metrics[{i}]", m)) for i, m in enumerate(metrics))
    names = [m.name for m in parsed]
    if len(set(names)) != len(names):
        reader.fail(f"metric names repeat: {names}")
    return TaskExpectation(name, parsed)


def _source(reader: _Reader) -> Source:
    reader.check_keys({"kind", "reference"}, set())
    kind = reader.string("kind")
    if kind not in SOURCE_KINDS:
        reader.fail(f"'kind' is '{kind}'; it must be one of {', '.join(SOURCE_KINDS)}")
    return Source(kind, reader.string("reference"))


def _measured_with(reader: _Reader) -> MeasuredWith:
    reader.check_keys({"vllm", "hardware", "date"}, {"gemmguard"})
    date = reader.data["date"]
    # YAML reads an unquoted 2026-11-24 as a date; accept it and keep the ISO text.
    if isinstance(date, datetime.date):
        date = date.isoformat()
    if not isinstance(date, str) or not re.match(r"^\d{4}-\d{2}-\d{2}$", date):
        reader.fail(f"'date' is {date!r}; write it as YYYY-MM-DD")
    gemmguard = reader.string("gemmguard") if "gemmguard" in reader.data else None
    return MeasuredWith(reader.string("vllm"), reader.string("hardware"), str(date), gemmguard)


_REQUIRED = {"model_name", "hardware", "tasks", "rtol", "num_fewshot", "source"}
_OPTIONAL = {f.name for f in fields(EvalConfig)} - _REQUIRED - {"path"}


def parse_config(data: object, source: str = "<config>", path: Path | None = None) -> EvalConfig:
    """Check a config mapping and turn it into an EvalConfig; raise UsageError naming the fault."""
    top = _Reader(source, "", data)
    top.check_keys(_REQUIRED, _OPTIONAL)
    hardware = top.string("hardware")
    if hardware not in HARDWARE_TARGETS:
        top.fail(
            f"'hardware' is '{hardware}', which is not a gemmguard hardware target; "
            f"use one of {', '.join(HARDWARE_TARGETS)}"
        )
    tasks = top.data["tasks"]
    if not isinstance(tasks, list) or not tasks:
        top.fail("'tasks' must be a non-empty list of {name, metrics}")
    parsed_tasks = tuple(_task(top.child(f"tasks[{i}]", t)) for i, t in enumerate(tasks))
    rtol = top.number("rtol")
    if not 0.0 <= rtol < 1.0:
        top.fail(f"'rtol' is {rtol}; it is a relative tolerance and must be in [0, 1)")
    src = _source(top.child("source", top.data["source"]))
    measured = top.data.get("measured_with")
    measured_with = (
        None if measured is None else _measured_with(top.child("measured_with", measured))
    )
    if src.kind == "measured" and measured_with is None:
        top.fail("source.kind is 'measured' but 'measured_with' is missing; say what it ran on")
    if src.kind != "measured" and measured_with is not None:
        top.fail(
            f"source.kind is '{src.kind}' but 'measured_with' is set; "
            "set kind to 'measured' or remove measured_with"
        )
    limit = top.data.get("limit")
    if limit is not None:
        limit = top.integer("limit", 1)
    max_model_len = top.data.get("max_model_len")
    if max_model_len is not None:
        max_model_len = top.integer("max_model_len", 1)
    vllm_args = top.data.get("vllm_args", [])
    if not isinstance(vllm_args, list) or not all(isinstance(a, str) for a in vllm_args):
        top.fail(f"'vllm_args' is {vllm_args!r}; it must be a list of strings (quote numbers)")
    env_vars = top.data.get("env_vars", {})
    if not isinstance(env_vars, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
    ):
        top.fail(f"'env_vars' is {env_vars!r}; it must map names to strings (quote numbers)")
    gen_kwargs = top.data.get("gen_kwargs", {})
    if not isinstance(gen_kwargs, Mapping):
        top.fail(f"'gen_kwargs' is {gen_kwargs!r}; it must be a mapping")
    return EvalConfig(
        model_name=top.string("model_name"),
        hardware=hardware,
        tasks=parsed_tasks,
        rtol=rtol,
        num_fewshot=top.integer("num_fewshot", 0),
        source=src,
        limit=limit,
        measured_with=measured_with,
        apply_chat_template="apply_chat_template" in top.data and top.flag("apply_chat_template"),
        max_model_len=max_model_len,
        vllm_args=tuple(vllm_args),
        env_vars=dict(env_vars),
        gen_kwargs=dict(gen_kwargs),
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
