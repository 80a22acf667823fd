"""Built-in corpora and tasks, user files."""
from __future__ import annotations

import pytest

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.data import load_dataset, pydoc_chunks
from adapterhub_c.evals.tasks import TASKS


def test_pydoc_splits_are_deterministic_and_disjoint():
    a, b = pydoc_chunks(), pydoc_chunks()
    assert a == b
    sets = {k: set(v) for k, v in a.items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["validation"])
    total = sum(len("".join(v)) for v in a.values())
    assert 0.04 < len("".join(a["test"])) / total < 0.2
    assert 0.04 < len("".join(a["validation"])) / total < 0.2


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_have_disjoint_splits(task):
    train = load_dataset(f"builtin:task/{task}", "train")
    test = load_dataset(f"builtin:task/{task}", "test")
    assert train.is_task and len(test) > 50 and len(train) > 500
    assert not {p for p, _ in train.pairs} & {p for p, _ in test.pairs}
    assert all(c.startswith(" ") and "\n" not in c for _, c in test.pairs)


def test_user_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x", "completion": " y"}\n\n{"prompt": "z", "completion": " w"}\n')
    assert load_dataset(str(tmp_path / "a.jsonl")).pairs == [("x", " y"), ("z", " w")]
    (tmp_path / "b.txt").write_text("one\n\n\ntwo")
    assert load_dataset(str(tmp_path / "b.txt")).texts == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(UsageError, match="c.jsonl:1"):
        load_dataset(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(UsageError, match="empty"):
        load_dataset(str(tmp_path / "d.jsonl"))
