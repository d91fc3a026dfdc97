"""`rayrag experiment` end to end on tiny models and a tiny SQuAD-format file: every stage, the report,
every prediction saved, the hot swap and the counterfactual index through the shard group, resuming from
the stage files, refusing a changed config and redoing a forced stage."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from training.cli import run_experiment
from training.experiment import STAGES, Experiment, load_experiment
from training.experiment_data import write_data
from training.predictions import read_predictions

ARTICLES = ("Alpha", "Beta", "Gamma", "Delta")
SUMMARY_KEYS = (
    "rag_sequence_em rag_token_em closed_book_em zero_shot_rag_em top1_read_em swap_matching_em "
    "swap_mismatched_em recall_at_5_before recall_at_5_after minutes bm25_em frozen_em hybrid_em "
    "recall_at_5_dense recall_at_5_bm25 recall_at_5_hybrid rag_sequence_em_ci95 rag_token_em_ci95 "
    "closed_book_em_ci95 p_rag_seq_vs_token p_rag_seq_vs_top1 counterfactual_follow_rate "
    "counterfactual_keep_rate closed_book_counterfactual_follow_rate validation_em test_questions "
    "wall_minutes stage_minutes"
).split()
TIMES = ("minutes", "wall_minutes", "stage_minutes")  # differ between invocations


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


@pytest.fixture(scope="module", autouse=True)
def _fixed_code_version() -> Iterator[None]:
    """The stage fingerprints' code version, pinned for the whole module (the shared run included):
    editing or committing while the tests run must not make a resumed run refuse its own stages."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("training.stages.code_version", lambda: "test-version")
        yield


@pytest.fixture(scope="module")
def experiment_config(toy, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("experiment")
    config = {
        "name": "tiny",
        "data": {
            "squad": _squad(root / "squad.json", toy),
            "test_articles": ["Delta"],
            "validation_articles": ["Gamma"],
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


def _run(config: str, out: Path, force: tuple[str, ...] = (), until: str | None = None) -> dict:
    """`rayrag experiment --config CONFIG --out OUT`; the summary line it prints."""
    args = argparse.Namespace(preset=None, config=config, out=str(out), force_stage=list(force), until=until)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_experiment(args) == 0
    return json.loads(printed.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def finished(experiment_config, ray_session, _fixed_code_version, tmp_path_factory) -> tuple[Path, dict]:
    """One run of every stage (six training runs), shared by the tests that read, resume or redo it:
    its folder and the summary line of that first run. Each test leaves every stage finished."""
    out = tmp_path_factory.mktemp("finished")
    return out, _run(experiment_config, out)


def _stable(line: dict) -> dict:
    return {k: v for k, v in line.items() if k not in TIMES}


def _check_predictions(out: Path, report: dict) -> None:
    """Every row's predictions are on disk, one line per question, with the passages read and p(z|x)."""
    files = {p.stem for p in (out / "predictions").glob("*.jsonl")}
    assert set(report["zero_shot"]) == {"test", "seconds"}  # the shipped models make no choice
    assert set(report["zero_shot"]["test"]["predictions"]) <= files
    for split in ("validation", "test"):
        for stage in ("fine_tuned", "fine_tuned_token", "closed_book", "bm25", "frozen", "hybrid"):
            assert set(report[stage][split]["predictions"]) <= files
    assert {
        "test_fine_tuned_rag_sequence",
        "test_fine_tuned_rag_sequence_k1",
        "test_swap_mismatched_rag_sequence",
    } <= files
    rows = read_predictions(out / "predictions" / "test_fine_tuned_rag_sequence.jsonl")
    assert len(rows) == 2 and {"question", "gold", "prediction", "em", "f1", "passages"} <= set(rows[0])
    assert all(len(r["passages"]) == 2 and abs(sum(p["p"] for p in r["passages"]) - 1) < 1e-4 for r in rows)
    fine_tuned = report["fine_tuned"]["test"]["settings"]["rag_sequence"]
    assert sum(r["em"] for r in rows) / 2 == fine_tuned["em"]  # the file scores as the report does
    closed = read_predictions(out / "predictions" / "test_closed_book_closed_book.jsonl")
    assert all(r["passages"] == [] for r in closed)


def test_until_data_writes_the_data_stage_only_without_ray(experiment_config, tmp_path, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("the data stage joined Ray")

    monkeypatch.setattr("cluster.runtime.init_ray", no_ray)
    line = _run(experiment_config, tmp_path, until="data")
    assert [p.name for p in (tmp_path / "stages").iterdir()] == ["data.json"]
    assert line["name"] == "tiny" and line["stopped_after"] == "data"
    expected = write_data(load_experiment(None, experiment_config).data, tmp_path / "again")
    assert {k: v for k, v in line["data"].items() if k != "seconds"} == expected
    assert (tmp_path / "data" / "test.jsonl").read_text() == (tmp_path / "again" / "test.jsonl").read_text()
    assert not (tmp_path / "report.json").exists()
    assert _run(experiment_config, tmp_path, until="data") == line  # read back, not re-run


def test_until_names_a_stage_the_config_runs(experiment_config, tmp_path):
    cpu = load_experiment("cpu", None)
    assert cpu.stages == STAGES[: STAGES.index("retrievers") + 1]  # no ablations asked for
    assert load_experiment(None, experiment_config).stages == STAGES
    for until in ("bm25", "report"):
        with pytest.raises(ValueError, match=f"unknown stage '{until}'.*'data', 'index'"):
            Experiment(cpu, tmp_path, until)


@pytest.mark.slow
def test_experiment_runs_every_stage_reports_and_resumes(experiment_config, finished):
    out, line = finished
    assert set(SUMMARY_KEYS) <= set(line), line
    report = json.loads((out / "report.json").read_text())
    data, index, swap = report["data"], report["index"], report["swap"]
    assert (data["train_articles"], data["validation_articles"], data["test_articles"]) == (2, 1, 1)
    assert (data["test_questions"], data["validation_questions"], line["test_questions"]) == (2, 2, 2)
    assert data["passages"] == 12 + 8 and data["passages_without_test"] == 12 + 6
    assert {"mismatched", "counterfactual", "matching"} <= set(index)
    # the swap went through the shard group to each version and back; swapped back, the model answers
    # the checked questions as the fine-tuned row did (same model, index version and decoding)
    assert swap["mismatched"]["version"] == index["mismatched"]
    assert swap["matching"]["version"] == index["matching"]
    assert swap["matching"]["identical_to_fine_tuned"] == 2
    counterfactual = report["counterfactual"]
    assert counterfactual["version"] == index["counterfactual"] and data["counterfactual_questions"] >= 1
    assert 0 <= line["counterfactual_follow_rate"] + line["counterfactual_keep_rate"] <= 100
    _check_predictions(out, report)
    for run in (
        "train_rag",
        "train_rag_token",
        "train_closed_book",
        "train_bm25",
        "train_frozen",
        "train_hybrid",
    ):
        losses = [json.loads(row) for row in Path(report[run]["history"]).read_text().splitlines()]
        assert sum("loss" in row for row in losses) == 2
    assert json.loads((out / "runs" / "rag_token" / "config.json").read_text())["mode"] == "token"
    for name in ("bm25", "hybrid"):  # each ablation row retrieved as its run trained
        assert (
            report[name]["test"]["retriever"] == name and "rag_sequence" in report[name]["test"]["settings"]
        )
    assert report["frozen"]["test"]["retriever"] == "dense"
    recall = report["retrievers"]["recall"]
    assert set(recall) == {"dense", "bm25", "hybrid"} and all(
        set(r) == {"1", "5", "10"} for r in recall.values()
    )
    assert recall["dense"]["5"] == report["fine_tuned"]["test"]["recall"]["5"]  # same query encoder and index
    results = (out / "results.md").read_text()
    for row in (
        "RAG-Sequence, fine-tuned",
        "test-time ablation",
        "RAG-Token loss",
        "frozen retriever",
        "follow",
    ):
        assert row in results, results
    assert "| bm25 |" in results and "(reference)" in results
    assert sorted(p.name for p in out.glob("*.png")) == ["em_f1.png", "loss.png", "recall.png"]

    (out / "stages" / "swap.json").unlink()  # as if stopped during the swap
    assert _stable(_run(experiment_config, out)) == _stable(line)
    assert sorted(p.stem for p in (out / "stages").glob("*.json")) == sorted(STAGES)


@pytest.mark.slow
def test_changed_config_is_refused_and_forced_stages_redone(experiment_config, finished, tmp_path):
    out, _ = finished
    line = _run(experiment_config, out)  # every stage read back (or finished, were one missing)
    stages = out / "stages"
    written = {p.stem: p.stat().st_mtime_ns for p in stages.glob("*.json")}

    raw = yaml.safe_load(Path(experiment_config).read_text())
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw | {"eval": raw["eval"] | {"max_new_tokens": 4}}))
    with pytest.raises(
        ValueError, match=r"stage 'zero_shot' .*max_new_tokens: 3 → 4.*--force-stage zero_shot"
    ):
        _run(str(changed), out)
    with pytest.raises(ValueError, match=r"stage 'counterfactual' .*input 'closed_book' changed"):
        _run(experiment_config, out, force=("closed_book",))
    forced = _run(experiment_config, out, force=("closed_book", "counterfactual"))
    assert _stable(forced) == _stable(line)
    again = {p.stem: p.stat().st_mtime_ns for p in stages.glob("*.json")}
    redone = {name for name in written if again[name] != written[name]}
    assert redone == {"closed_book", "counterfactual"}
    with pytest.raises(ValueError, match="no such stage"):
        _run(experiment_config, out, force=("train_everything",))


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
    overlap = raw["data"] | {"validation_articles": ["Delta"]}
    path = tmp_path / "overlap.yaml"
    path.write_text(yaml.safe_dump(raw | {"data": overlap}))
    with pytest.raises(ValueError, match=r"validation_articles.*\['Delta'\] are test articles too"):
        load_experiment(None, str(path))
    for preset in ("cpu", "cpu_retrievers", "gpu"):
        assert load_experiment(preset, None).data.test_questions >= 1000
