"""Each non-QA task trains with Ray Train on the toy and is evaluated by `rayrag eval --task`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayrag_cli import main
from training.config import config_from_dict
from training.tasks import get_task
from training.trainer import run_training

pytestmark = pytest.mark.slow  # see pyproject.toml: `pytest -m "not slow"` skips it

STEPS = 12


def _claims(toy, keys: list[str]) -> list[dict]:
    """A true claim for each key (its answer) and a false one (the next key's answer)."""
    claims = []
    for key, other in zip(keys, keys[1:] + keys[:1]):
        claims.append({"claim": f"{key} is {toy.answers[key]}", "label": "true"})
        claims.append({"claim": f"{key} is {toy.answers[other]}", "label": "false"})
    return claims


@pytest.fixture()
def task_data(toy, tmp_path, request) -> tuple[str, str]:
    """(train, eval) data of the task: qgen turns the toy's QA files around; classify gets claims."""
    if request.param == "qgen":
        return toy.train, toy.heldout
    keys = [json.loads(line)["question"].rstrip("?") for line in open(toy.train)]
    held = [json.loads(line)["question"].rstrip("?") for line in open(toy.heldout)]
    paths = []
    for name, rows in (("train", _claims(toy, keys)), ("heldout", _claims(toy, held))):
        path = tmp_path / f"claims-{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.mark.parametrize("task_data", ["qgen", "classify"], indirect=True)
def test_task_trains_and_evaluates(toy, toy_index, task_data, tmp_path, capsys):
    task = get_task("qgen" if task_data[0] == toy.train else "classify")
    train, heldout = task_data
    cfg = config_from_dict(
        toy.raw_config(
            tmp_path,
            task=task.name,
            data={"train": train},
            index={"root": str(toy_index)},  # not refreshed: shared read-only
            scaling={"num_workers": 1},
            schedule={"steps": STEPS, "checkpoint_every": STEPS},
        )
    )
    outcome = run_training(cfg)
    losses = [json.loads(line)["loss"] for line in open(outcome.history) if '"loss"' in line]
    assert len(losses) == STEPS and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses

    capsys.readouterr()
    out = tmp_path / "eval"
    args = ["eval", "--task", task.name, "--data", heldout, "--index-root", str(toy_index)]
    args += ["--checkpoint", outcome.result.checkpoint.path, "--n-docs", "1", "3", "--out", str(out)]
    assert main(args + ["--num-beams", "2", "--max-new-tokens", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert set(summary) == {"closed_book", "rag_token", "rag_sequence"}
    for name, row in summary.items():
        assert row == {k: report["settings"][name][k] for k in task.summary}
        assert all(0.0 <= v <= 1.0 for v in row.values()), row
    assert (out / f"{task.summary[0]}_vs_n_docs.png").stat().st_size > 0
    assert "recall" not in report and report["config"]["task"] == task.name
    examples = report["settings"]["rag_sequence"]["by_n_docs"]["3"]["examples"]
    source, gold = task.fields
    first = json.loads(open(heldout).readline())
    if task.name == "qgen":  # the input is the answer, the target the question
        assert examples[0][source] == first["answers"][0] and examples[0][gold] == [first["question"]]
    else:
        assert report["config"]["labels"] == ["false", "true"]
        assert examples[0][source] == first["claim"] and examples[0][gold] == [first["label"]]
        assert all(e["prediction"] in ("false", "true") for e in examples)
