"""Local lm-eval task files (evals/tasks/*.yaml) made runnable from any working directory.

The task files name their data relative to the task file itself. lm-eval would resolve those
paths from the working directory, so before a run each task file is copied into a scratch
folder with its data paths made absolute, and lm-eval is pointed at that folder only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from gemmguard.errors import UsageError

# Where the shipped configs keep their tasks: evals/tasks beside evals/<config>.yaml.
TASKS_FOLDER = "tasks"


def default_tasks_dir(config_path: Path | None) -> Path:
    """The tasks folder that belongs to a config: `tasks/` next to the config file."""
    base = config_path.resolve().parent if config_path is not None else Path.cwd()
    return base / TASKS_FOLDER


def available_tasks(tasks_dir: Path) -> dict[str, Path]:
    """Task name -> task file, for every task file in `tasks_dir`."""
    found: dict[str, Path] = {}
    for path in sorted(tasks_dir.glob("*.yaml")):
        data = _read(path)
        name = data.get("task")
        if isinstance(name, str):
            found[name] = path
    return found


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        # `!function` tags (Python hooks) are not used here: the data must stay plain YAML.
        raise UsageError(f"Task file {path} is not plain YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"Task file {path} must hold a mapping with a 'task' key.")
    return data


def _absolute_data_files(data_files: object, task_file: Path) -> object:
    """data_files (a path, a list, or a split -> path(s) mapping) made absolute and checked."""
    if isinstance(data_files, str):
        path = Path(data_files)
        if not path.is_absolute():
            path = (task_file.parent / path).resolve()
        if not path.is_file():
            raise UsageError(
                f"Task file {task_file} names data file '{data_files}', which is not at {path}. "
                "Restore evals/data/ from the repository (it is checked in)."
            )
        return str(path)
    if isinstance(data_files, list):
        return [_absolute_data_files(item, task_file) for item in data_files]
    if isinstance(data_files, Mapping):
        return {split: _absolute_data_files(v, task_file) for split, v in data_files.items()}
    raise UsageError(
        f"Task file {task_file}: dataset_kwargs.data_files is {data_files!r}; expected a path, "
        "a list of paths, or a mapping of split names to paths."
    )


def render_task(task_file: Path) -> dict[str, Any]:
    """The task file's content with every local data path made absolute."""
    data = _read(task_file)
    kwargs = data.get("dataset_kwargs")
    if isinstance(kwargs, Mapping) and "data_files" in kwargs:
        data["dataset_kwargs"] = {
            **kwargs,
            "data_files": _absolute_data_files(kwargs["data_files"], task_file),
        }
    return data


def render_tasks(names: Iterable[str], tasks_dir: Path, out_dir: Path) -> list[str]:
    """Write the named tasks, with absolute data paths, into `out_dir`; return their names."""
    known = available_tasks(tasks_dir)
    rendered = []
    for name in names:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise UsageError(
                f"Task '{name}' is not defined in {tasks_dir} (tasks there: {listed}). "
                "Fix the task name in the config, or pass --tasks-dir with the folder that has it."
            )
        out = out_dir / known[name].name
        out.write_text(yaml.safe_dump(render_task(known[name]), sort_keys=False))
        rendered.append(name)
    return rendered
