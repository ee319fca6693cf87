"""Local lm-eval tasks: runnable from any directory, data intact, answers extracted right."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gemmguard.errors import UsageError
from gemmguard.evaluation.tasks import available_tasks, render_task, render_tasks

EVALS = Path(__file__).resolve().parent.parent / "evals"
TASKS = EVALS / "tasks"
GSM8K = EVALS / "data" / "gsm8k"


def test_available_tasks_lists_the_local_gsm8k() -> None:
    assert available_tasks(TASKS) == {"gsm8k_local": TASKS / "gsm8k_local.yaml"}


def test_rendered_task_has_absolute_existing_data_paths_whatever_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    files = render_task(TASKS / "gsm8k_local.yaml")["dataset_kwargs"]["data_files"]
    assert files == {
        "train": str(GSM8K.resolve() / "train.jsonl.gz"),
        "test": str(GSM8K.resolve() / "test.jsonl"),
    }
    # The checked-in file keeps its relative paths; only the copy is rewritten.
    original = yaml.safe_load((TASKS / "gsm8k_local.yaml").read_text())
    assert original["dataset_kwargs"]["data_files"]["test"] == "../data/gsm8k/test.jsonl"


def test_render_tasks_writes_copies_and_rejects_unknown_names(tmp_path: Path) -> None:
    assert render_tasks(["gsm8k_local"], TASKS, tmp_path) == ["gsm8k_local"]
    copy = yaml.safe_load((tmp_path / "gsm8k_local.yaml").read_text())
    assert Path(copy["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    with pytest.raises(UsageError, match=r"Task 'gsm8k' is not defined in .* gsm8k_local"):
        render_tasks(["gsm8k"], TASKS, tmp_path)


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    task = tmp_path / "t.yaml"
    task.write_text(yaml.safe_dump({"task": "t", "dataset_path": "json",
                                    "dataset_kwargs": {"data_files": {"test": "gone.jsonl"}}}))
    with pytest.raises(UsageError, match=r"names data file 'gone.jsonl', which is not at"):
        render_task(task)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_gsm8k_data_is_complete_unchanged_and_licensed() -> None:
    test = (GSM8K / "test.jsonl").read_bytes()
    train = gzip.decompress((GSM8K / "train.jsonl.gz").read_bytes())
    readme = (GSM8K / "README.md").read_text()
    assert _sha256(test) in readme and _sha256(train) in readme
    rows = [json.loads(line) for line in test.splitlines()]
    assert len(rows) == 1319 and len(train.splitlines()) == 7473
    assert all(set(r) == {"question", "answer"} and "#### " in r["answer"] for r in rows)
    licence = (GSM8K / "LICENSE").read_text()
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence


def test_task_matches_lm_evals_own_gsm8k_but_for_the_data_source() -> None:
    import lm_eval

    upstream = yaml.safe_load(
        (Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text()
    )
    ours = yaml.safe_load((TASKS / "gsm8k_local.yaml").read_text())
    where_from = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs"}
    assert {k: v for k, v in ours.items() if k not in where_from} == {
        k: v for k, v in upstream.items() if k not in where_from
    }


@pytest.fixture(scope="module")
def gsm8k_task(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """lm-eval's task object built from our rendered task file, offline."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    scratch = tmp_path_factory.mktemp("tasks")
    render_tasks(["gsm8k_local"], TASKS, scratch)
    manager = TaskManager(include_path=str(scratch), include_defaults=False)
    yield manager.load(["gsm8k_local"])["tasks"]["gsm8k_local"]
    mp.undo()


def test_task_reads_the_local_rows(gsm8k_task: Any) -> None:
    assert len(gsm8k_task.test_docs()) == 1319
    assert len(gsm8k_task.training_docs()) == 7473
    assert gsm8k_task.test_docs()[0]["answer"].endswith("#### 18")


def _extract_and_score(task: Any, doc: dict[str, Any], reply: str) -> dict[str, tuple[str, float]]:
    """Run `reply` through the task's own filters and metric, as lm-eval does in a run."""
    from lm_eval.api.instance import Instance

    out = {}
    for ensemble in task._filters:
        instance = Instance("generate_until", doc, ("", {}), 0)
        instance.resps = [reply]
        ensemble.apply([instance])
        extracted = instance.filtered_resps[ensemble.name]
        score = task.process_results(doc, [extracted])["exact_match"]
        out[ensemble.name] = (extracted, float(score))
    return out


# Replies to test doc 0 (Janet's ducks, answer 18): (strict-match, flexible-extract) results.
REPLIES = {
    "dataset format": ("She makes 9 * 2 = $18.\n#### 18", ("18", 1.0), ("18", 1.0)),
    "no #### marker": ("The answer is $18.", ("[invalid]", 0.0), ("$18.", 1.0)),
    "wrong number": ("16 - 3 - 4 = 9\n#### 17", ("17", 0.0), ("17", 0.0)),
    "last number counts": ("18 eggs, no: 19.", ("[invalid]", 0.0), ("19.", 0.0)),
    "thousands comma ignored": ("#### 1,8", ("1,8", 1.0), ("1,8", 1.0)),
    "decimal is not equal": ("#### 18.00", ("18.00", 0.0), ("18.00", 0.0)),
    "gibberish": ("\ufffd#K\ufffdb", ("[invalid]", 0.0), ("[invalid]", 0.0)),
}


@pytest.mark.parametrize("reply,strict,flexible", REPLIES.values(), ids=list(REPLIES))
def test_answer_extraction_and_scoring(
    gsm8k_task: Any, reply: str, strict: tuple[str, float], flexible: tuple[str, float]
) -> None:
    doc = gsm8k_task.test_docs()[0]
    assert _extract_and_score(gsm8k_task, doc, reply) == {
        "strict-match": strict, "flexible-extract": flexible,
    }
