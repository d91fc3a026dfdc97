"""`rayrag experiment` end to end on tiny models and a tiny SQuAD-format file: every stage, the report,
the hot swap through the shard group, and resuming from the stage files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from training.cli import run_experiment
from training.experiment import STAGES, Experiment, load_experiment, write_data

ARTICLES = ("Alpha", "Beta", "Gamma", "Delta")
SUMMARY_KEYS = (
    "rag_sequence_em rag_token_em closed_book_em zero_shot_rag_em top1_read_em swap_matching_em "
    "swap_mismatched_em recall_at_5_before recall_at_5_after minutes bm25_em frozen_em hybrid_em "
    "recall_at_5_dense recall_at_5_bm25 recall_at_5_hybrid"
).split()


def _squad(path: Path, toy) -> str:
    """Four articles of two paragraphs; each paragraph holds toy keys' answers and asks about one."""
    keys = list(toy.answers)
    data = []
    for a, title in enumerate(ARTICLES):
        paragraphs = []
        for p in range(2):
            key = keys[2 * a + p]
            qa = {"id": f"{a}{p}", "question": f"{key}?", "answers": [{"text": toy.answers[key]}]}
            paragraphs.append({"context": f"{key} {toy.answers[key]} in {title}", "qas": [qa]})
        data.append({"title": title, "paragraphs": paragraphs})
    path.write_text(json.dumps({"data": data}))
    return str(path)


@pytest.fixture(scope="module")
def experiment_config(toy, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("experiment")
    config = {
        "name": "tiny",
        "data": {
            "squad": _squad(root / "squad.json", toy),
            "test_articles": ["Delta"],
            "test_questions": 2,
            "distractors": toy.corpus,
            "distractor_limit": 12,
        },
        "models": {
            "query_encoder": toy.encoder,
            "doc_encoder": toy.encoder,
            "generator": toy.generator,
            "precision": "float32",
        },
        "train": {
            "n_docs": 2,
            "optimizer": {"lr": 1e-3},
            "schedule": {"steps": 2, "batch_size": 2, "checkpoint_every": 2},
            "scaling": {"num_workers": 1},
            "compute": {"precision": "float32"},
        },
        "eval": {"n_docs": 2, "max_new_tokens": 3, "batch_size": 2},
        "ablations": ["bm25", "frozen", "hybrid"],
    }
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _run(config: str, out: Path, capsys, until: str | None = None) -> dict:
    assert run_experiment(argparse.Namespace(preset=None, config=config, out=str(out), until=until)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_until_data_writes_the_data_stage_only_without_ray(experiment_config, tmp_path, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("the data stage joined Ray")

    monkeypatch.setattr("cluster.runtime.init_ray", no_ray)
    line = _run(experiment_config, tmp_path, capsys, until="data")
    assert [p.name for p in (tmp_path / "stages").iterdir()] == ["data.json"]
    assert line["name"] == "tiny" and line["stopped_after"] == "data"
    expected = write_data(load_experiment(None, experiment_config).data, tmp_path / "again")
    assert {k: v for k, v in line["data"].items() if k != "seconds"} == expected
    assert (tmp_path / "data" / "test.jsonl").read_text() == (tmp_path / "again" / "test.jsonl").read_text()
    assert not (tmp_path / "report.json").exists()
    assert _run(experiment_config, tmp_path, capsys, until="data") == line  # read back, not re-run


def test_until_names_a_stage_the_config_runs(experiment_config, tmp_path):
    cpu = load_experiment("cpu", None)
    assert cpu.stages == STAGES[: STAGES.index("retrievers") + 1]  # no ablations asked for
    assert load_experiment(None, experiment_config).stages == STAGES
    for until in ("bm25", "report"):
        with pytest.raises(ValueError, match=f"unknown stage '{until}'.*'data', 'index'"):
            Experiment(cpu, tmp_path, until)


@pytest.mark.slow
def test_experiment_runs_every_stage_reports_and_resumes(experiment_config, ray_session, tmp_path, capsys):
    line = _run(experiment_config, tmp_path, capsys)
    assert set(SUMMARY_KEYS) <= set(line), line
    report = json.loads((tmp_path / "report.json").read_text())
    data, index, swap = report["data"], report["index"], report["swap"]
    assert (data["train_articles"], data["test_articles"], data["test_questions"]) == (3, 1, 2)
    assert data["passages"] == 12 + 8 and data["passages_without_test"] == 12 + 6
    # the swap went through the shard group to each version and back; the matching side is the
    # fine-tuned RAG-Sequence row again (same model, index version and decoding)
    assert swap["mismatched"]["version"] == index["mismatched"]
    assert swap["matching"]["version"] == index["matching"]
    matching, fine_tuned = swap["matching"]["settings"], report["fine_tuned"]["settings"]
    assert matching["rag_sequence"]["by_n_docs"]["2"] == fine_tuned["rag_sequence"]["by_n_docs"]["2"]
    for run in ("train_rag", "train_closed_book", "train_bm25", "train_frozen", "train_hybrid"):
        losses = [json.loads(row) for row in Path(report[run]["history"]).read_text().splitlines()]
        assert sum("loss" in row for row in losses) == 2
    for name in ("bm25", "hybrid"):  # each ablation row retrieved as its run trained
        assert report[name]["retriever"] == name and "rag_sequence" in report[name]["settings"]
    assert report["frozen"]["retriever"] == "dense"
    recall = report["retrievers"]["recall"]
    assert set(recall) == {"dense", "bm25", "hybrid"} and all(
        set(r) == {"1", "5", "10"} for r in recall.values()
    )
    assert recall["dense"]["5"] == report["fine_tuned"]["recall"]["5"]  # the same query encoder and index
    results = (tmp_path / "results.md").read_text()
    for row in (
        "RAG-Sequence, fine-tuned",
        "RAG-Sequence, BM25 retriever",
        "frozen retriever",
        "hybrid retriever",
    ):
        assert row in results, results
    assert "| bm25 |" in results
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["em_f1.png", "loss.png", "recall.png"]

    (tmp_path / "stages" / "swap.json").unlink()  # as if stopped during the last stage
    again = _run(experiment_config, tmp_path, capsys)
    assert again.pop("minutes") >= 0 and line.pop("minutes") >= 0
    assert again == line
    assert sorted(p.stem for p in (tmp_path / "stages").glob("*.json")) == sorted(STAGES)


def test_experiment_config_errors_name_the_key(experiment_config, tmp_path):
    raw = yaml.safe_load(Path(experiment_config).read_text())
    for change, message in (
        ({"train": raw["train"] | {"n_docs": 0}}, "config key 'train'"),
        ({"train": raw["train"] | {"name": "x"}}, "must not set"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw | change))
        with pytest.raises(ValueError, match=message):
            load_experiment(None, str(path))
    data = load_experiment(None, experiment_config).data.model_copy(update={"test_articles": ("Omega",)})
    with pytest.raises(ValueError, match="no such articles \\['Omega'\\]"):
        write_data(data, tmp_path / "data")
    with pytest.raises(ValueError, match="unknown preset"):
        load_experiment("tpu", None)
    for preset in ("cpu", "gpu"):
        assert load_experiment(preset, None).data.test_questions >= 300
