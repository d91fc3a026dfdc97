"""Stage fingerprints (training/stages.py) and the training resume check (trainer.check_resumable): a
changed config, code version or input is refused naming what changed; forcing redoes a stage and its
dependents then refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.rag.checkpoint import TrainState
from training.checkpoint import save_checkpoint
from training.config import config_from_dict
from training.stages import StageStore, code_version, config_changes
from training.trainer import RUN_CONFIG, check_resumable, run_config


def test_config_changes_name_the_nested_key():
    old = {"optimizer": {"lr": 1e-4, "wd": 0.0}, "steps": 10}
    new = {"optimizer": {"lr": 3e-4, "wd": 0.0}, "steps": 10, "mode": "token"}
    assert config_changes(old, new) == ["mode: None → 'token'", "optimizer.lr: 0.0001 → 0.0003"]
    assert config_changes(old, json.loads(json.dumps(old))) == []


def test_code_version_is_the_checkout_or_the_package():
    version = code_version()
    assert version and version == code_version()
    if (Path(__file__).resolve().parents[2] / ".git").exists():
        assert not version.startswith("rayrag ")  # git describe of the checkout


def test_a_stage_is_reused_only_with_the_same_fingerprint(tmp_path):
    store = StageStore(tmp_path, code="abc123")
    first = store.fingerprint({"seed": 0}, inputs=())
    assert store.reuse("data", first) is None  # not run yet
    store.save("data", first, {"questions": 3})
    assert store.reuse("data", store.fingerprint({"seed": 0}, ())) == {"questions": 3}
    with pytest.raises(ValueError, match=r"stage 'data' .*config seed: 0 → 1.*--force-stage data"):
        store.reuse("data", store.fingerprint({"seed": 1}, ()))
    other_code = StageStore(tmp_path, code="def456")
    with pytest.raises(ValueError, match="code version 'abc123' → 'def456'"):
        other_code.reuse("data", other_code.fingerprint({"seed": 0}, ()))


def test_forcing_a_stage_redoes_it_and_its_dependents_refuse_until_forced(tmp_path):
    store = StageStore(tmp_path, code="abc")
    store.save("train", store.fingerprint({"lr": 1}, ()), {"checkpoint": "a"})
    eval_print = store.fingerprint({"k": 5}, inputs=("train",))
    store.save("eval", eval_print, {"em": 0.5})
    assert store.reuse("eval", store.fingerprint({"k": 5}, ("train",))) == {"em": 0.5}

    forced = StageStore(tmp_path, force={"train"}, code="abc")
    assert forced.reuse("train", forced.fingerprint({"lr": 1}, ())) is None  # redone although unchanged
    forced.save("train", forced.fingerprint({"lr": 1}, ()), {"checkpoint": "a"})  # the same result
    with pytest.raises(ValueError, match="stage 'eval' .*input 'train' changed.*--force-stage eval"):
        forced.reuse("eval", forced.fingerprint({"k": 5}, ("train",)))
    both = StageStore(tmp_path, force={"train", "eval"}, code="abc")
    assert both.reuse("eval", both.fingerprint({"k": 5}, ("train",))) is None


def test_a_stage_file_without_fingerprint_is_refused(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps({"questions": 3, "seconds": 1.0}))
    store = StageStore(tmp_path, code="abc")
    with pytest.raises(ValueError, match="no fingerprint"):
        store.reuse("data", store.fingerprint({}, ()))
    with pytest.raises(ValueError, match="stage 'index' has not run"):
        store.fingerprint({}, ("index",))


def _train_config(tmp_path: Path, **overrides) -> object:
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q?", "answers": ["a"]}\n')
    raw = {
        "name": "run",
        "storage_path": str(tmp_path / "runs"),
        "data": {"train": str(data)},
        "index": {"root": str(tmp_path / "index")},
        "models": {"query_encoder": "q", "doc_encoder": "d", "generator": "g"},
        "optimizer": {"lr": 1e-4},
        "schedule": {"steps": 4, "batch_size": 2},
    }
    return config_from_dict({**raw, **overrides})


def test_training_resume_refuses_a_checkpoint_trained_with_another_config(tmp_path):
    cfg = _train_config(tmp_path)
    run_dir = tmp_path / "runs" / "run"
    check_resumable(cfg)  # nothing to resume
    models = {"query_encoder": "q", "doc_encoder": "d", "generator": "g"}
    save_checkpoint(run_dir / "step-000002", {}, None, TrainState(2, "v0001", models))
    with pytest.raises(ValueError, match="records no config"):
        check_resumable(cfg)
    (run_dir / RUN_CONFIG).write_text(json.dumps(run_config(cfg)))
    check_resumable(cfg)  # the same config resumes
    check_resumable(_train_config(tmp_path, scaling={"num_workers": 2}))  # more workers: the same run
    answering = models | {"precision": "bfloat16"}  # the weights when answering: training never reads them
    check_resumable(_train_config(tmp_path, models=answering))
    with pytest.raises(ValueError, match=r"will not resume .*optimizer.lr: 0.0001 → 0.0003"):
        check_resumable(_train_config(tmp_path, optimizer={"lr": 3e-4}))
    with pytest.raises(ValueError, match=r"schedule.steps: 4 → 8"):
        check_resumable(_train_config(tmp_path, schedule={"steps": 8, "batch_size": 2}))
