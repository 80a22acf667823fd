"""`adapt merge replay` re-runs a written merge_config.yaml through the merge's own run; and the
idempotency key of the training commands leaves out what only changes the measurement (issue 24)."""
from __future__ import annotations

import pytest
import torch
from sqlalchemy import select
from test_merge_ops import deltas, make_lora, register_lora, stored_adapter

from adapterhub_c import api
from adapterhub_c.errors import UsageError
from adapterhub_c.registry.models import Run
from adapterhub_c.workflows.merges import MERGE_CONFIG_FILE


@pytest.fixture
def pair(reg, tiny_base, tmp_path):
    for name, seed in (("lora-a", 1), ("lora-b", 2)):
        register_lora(reg, tiny_base, name, make_lora(seed), tmp_path)


def _merge_runs(reg) -> list[Run]:
    with reg.session() as s:
        return list(s.scalars(select(Run).where(Run.command == "merge").order_by(Run.started_at)))


@pytest.mark.parametrize("method,extra", [
    ("ties", ["--density", "0.5", "--rank", "3", "--svd", "exact"]),
    ("dare-linear", ["--density", "0.6", "--seed", "7", "--weights", "1,0.5"]),
])
def test_replay_registers_the_same_delta_and_refuses_a_changed_input(cli, reg, pair, tiny_base, tmp_path, method,
                                                                    extra):
    r = cli("merge", "lora-a", "lora-b", "--method", method, *extra, "--device", "cpu", "--name", "orig", "--json")
    assert r.code == 0, r.err
    original, folder = stored_adapter(reg, "orig")
    config = tmp_path / "merge_config.yaml"
    config.write_text((folder / MERGE_CONFIG_FILE).read_text())

    r = cli("merge", "replay", str(config), "--name", "again", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["artifact"] == "again" and rep["kind"] == "merged" and rep["method"] == method
    replayed, replay_folder = stored_adapter(reg, "again")
    assert set(replayed.tensors) == set(original.tensors)
    for k, v in original.tensors.items():
        assert torch.equal(replayed.tensors[k], v), k
    for m, d in deltas(original).items():
        assert torch.equal(deltas(replayed)[m], d), m
    assert (replay_folder / MERGE_CONFIG_FILE).read_text() == config.read_text()
    with reg.session() as s:
        art = reg.resolve(s, "again", "artifact")
        assert sorted((role, p.name) for role, p in reg.parents(s, art)) == [("merge-input", "lora-a"),
                                                                              ("merge-input", "lora-b")]
        assert s.get(Run, art.run_id).status == "succeeded" and s.get(Run, art.run_id).command == "merge"
    # the same workflow path: idempotent by name, and the original merge's own parameters
    runs = _merge_runs(reg)
    assert len(runs) == 2 and runs[0].parameters == {**runs[1].parameters, "name": "orig"}
    assert cli("merge", "replay", str(config), "--name", "again", "--device", "cpu", "--json").json()["already_done"]
    assert cli("merge", "replay", str(config), "--name", "orig", "--device", "cpu", "--json").json()["already_done"]
    assert len(_merge_runs(reg)) == 2
    again = api.replay_merge(config.read_text(), name="again", device="cpu", registry=reg)
    assert again.name == "again" and not again.created

    # lora-b replaced by another adapter of the same name: the recorded id is gone, the name
    # finds the new one, whose weights are not those the merge read
    api.remove("lora-b", cascade=True, registry=reg)
    register_lora(reg, tiny_base, "lora-b", make_lora(5), tmp_path / "other")
    r = cli("merge", "replay", str(config), "--name", "third", "--device", "cpu")
    assert r.code == 2 and "'lora-b' has changed since the merge" in r.err
    assert len(r.err.strip().splitlines()) == 1
    with pytest.raises(UsageError, match="changed since the merge"):
        api.replay_merge(config, name="third", device="cpu", registry=reg)
    assert len(_merge_runs(reg)) == 2  # refused before a run was opened


def test_replay_finds_inputs_by_id_before_name(cli, reg, pair, tmp_path):
    assert cli("merge", "lora-a", "lora-b", "--method", "task-arithmetic", "--device", "cpu", "--name", "m").code == 0
    _, folder = stored_adapter(reg, "m")
    text = (folder / MERGE_CONFIG_FILE).read_text().replace("name: lora-a", "name: renamed-away")
    out = api.replay_merge(text, name="m2", device="cpu", registry=reg)
    assert [i["name"] for i in out.report["inputs"]] == ["lora-a", "lora-b"]
    r = cli("merge", "replay", str(tmp_path / "missing.yaml"))
    assert r.code == 2


FAST = dict(rank=4, alpha=8, steps=2, lr=3e-3, batch_size=2, seq_len=32, max_eval_tokens=200, max_eval_examples=2)


def test_a_rerun_that_only_measures_differently_is_the_earlier_result(reg, tiny_base):
    """--max-eval-tokens / --max-eval-examples / --eval-data change what is measured, not what is made: a rerun
    with the same name returns the earlier adapter; a changed training option is still refused."""
    first = api.train(tiny_base.name, "builtin:task/reverse-words", name="t", registry=reg, **FAST)
    assert first.created
    for change in ({"max_eval_tokens": 100}, {"max_eval_examples": 3}, {"eval_data": "builtin:pydoc"}):
        again = api.train(tiny_base.name, "builtin:task/reverse-words", name="t", registry=reg, **{**FAST, **change})
        assert not again.created and again.id == first.id and again.report["already_done"], change
    with pytest.raises(UsageError, match="made by other options"):
        api.train(tiny_base.name, "builtin:task/reverse-words", name="t", registry=reg, **{**FAST, "steps": 3})
    with reg.session() as s:  # the run row still records every option
        run = s.get(Run, reg.get("t", "artifact").run_id)
        assert run.parameters["max_eval_tokens"] == 200 and run.parameters["max_eval_examples"] == 2
