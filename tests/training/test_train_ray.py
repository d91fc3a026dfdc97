"""Ray Train runs on the toy task: loss, refresh beside training, worker failure, elastic size, DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest
import ray
import torch

from cluster.index_store import published_version
from rayrag_cli import main
from services.rag.checkpoint import read_state
from training.config import config_from_dict
from training.trainer import prepare_index, run_training

pytestmark = pytest.mark.slow  # see pyproject.toml: `pytest -m "not slow"` skips it

cloudpickle.register_pickle_by_value(sys.modules[__name__])
STEPS = 16


def history_rows(path) -> list[dict]:
    """Rows of the JSONL history; a line still being written is left for the next read."""
    return [json.loads(line) for line in open(path) if line.endswith("\n")] if os.path.exists(path) else []


def fresh_index(toy_index, run_dir) -> None:
    shutil.copytree(toy_index, run_dir / "index")


def test_refresh_beside_training_loss_falls_and_eval(toy, toy_index, tmp_path, capsys):
    fresh_index(toy_index, tmp_path)
    cfg = config_from_dict(
        toy.raw_config(
            tmp_path,
            train_doc_encoder=True,
            refresh="0-4:4",
            schedule={"steps": STEPS, "checkpoint_every": 8},
        )
    )
    outcome = run_training(cfg)
    rows = [r for r in history_rows(outcome.history) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert np.mean([r["loss"] for r in rows[-3:]]) < 0.7 * np.mean([r["loss"] for r in rows[:3]])
    # the refresh asked for at step 4 became version v0002, published and swapped in
    assert [(r["step"], r["version"]) for r in outcome.refresh["refreshes"]] == [(4, "v0002")]
    assert published_version(tmp_path / "index") == "v0002"
    versions = [r["index_version"] for r in rows]
    # steps after the request kept running on v0001 while the corpus was re-encoded ...
    assert versions[4] == "v0001"
    # ... and once the swap landed, every later step searched v0002
    assert versions == sorted(versions)
    state = read_state(outcome.result.checkpoint.path)
    assert state.step == STEPS and state.index_version == versions[-1] and state.doc_encoder_trained

    capsys.readouterr()
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--qa",
                toy.train,
                "--index-root",
                str(tmp_path / "index"),
                "--checkpoint",
                outcome.result.checkpoint.path,
                "--n-docs",
                "1",
                "3",
                "--num-beams",
                "2",
                "--max-new-tokens",
                "3",
                "--history",
                str(outcome.history),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"closed_book", "rag_token", "rag_sequence"}
    assert (out / "loss.png").stat().st_size > 0 and (out / "em_vs_n_docs.png").stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert report["index_versions"] == ["v0002"] and report["questions"] == 24
    for name, row in summary.items():
        assert row == {k: report["settings"][name][k] for k in ("em", "f1", "recall_at_5")}
    assert summary["closed_book"]["recall_at_5"] is None
    assert summary["rag_token"]["recall_at_5"] == report["recall"]["5"]


def test_worker_killed_resumes_from_checkpoint_elastic_one_worker(toy, toy_index, tmp_path):
    """num_workers=(1, 2) where only one worker fits; SIGKILL it mid-run; Ray Train restarts it
    from a checkpoint and the run ends at the right step on the right index version."""
    fresh_index(toy_index, tmp_path)
    every = 2
    cfg = config_from_dict(
        toy.raw_config(
            tmp_path,
            max_failures=1,
            scaling={"num_workers": [1, 2]},
            schedule={"steps": 10, "checkpoint_every": every},
        )
    )
    fits_once = {"CPU": 0.6 * ray.cluster_resources()["CPU"]}
    outcome, errors = {}, []

    def fit() -> None:
        try:
            outcome["value"] = run_training(cfg, resources_per_worker=fits_once)
        except BaseException as error:  # re-raised below in the test thread
            errors.append(error)

    runner = threading.Thread(target=fit)
    runner.start()
    history = tmp_path / "runs" / "toy" / "history.jsonl"
    deadline, killed = time.monotonic() + 240, None
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        # kill once the worker has stepped past its second checkpoint: a report returns only when
        # Ray Train has taken the one before it, so the first checkpoint is registered by then
        before_kill = [r["step"] for r in history_rows(history) if "loss" in r]
        if before_kill and before_kill[-1] > 2 * every:
            killed = history_rows(history)[0]["pids"][0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    runner.join(timeout=300)
    if errors:
        raise errors[0]
    assert killed is not None, "the run ended before the worker could be killed"
    rows = history_rows(history)
    starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
    assert [rows[i]["world_size"] for i in starts] == [1, 1]
    resumed, first_run = rows[starts[1]], [r["step"] for r in rows[: starts[1]] if "loss" in r]
    # resumed from a checkpoint the first worker saved (not from scratch), and went on from its step
    assert resumed["step"] in range(every, max(first_run) + 1, every)
    assert resumed["resumed_from"].endswith(f"step-{resumed['step']:06d}")
    assert [r["step"] for r in rows[starts[1] :] if "loss" in r] == list(range(resumed["step"] + 1, 11))
    result = outcome["value"].result
    assert result.metrics["step"] == 10 and result.metrics["index_version"] == "v0001"
    assert read_state(result.checkpoint.path).step == 10
    kept = sorted(os.path.basename(checkpoint.path) for checkpoint, _ in result.best_checkpoints)
    assert kept == ["step-000008", "step-000010"]  # num_to_keep=2 of the checkpoints every 2 steps


def _gradient_probe(loop_config: dict) -> None:
    """One DDP forward/backward over the global batch; rank 0 saves the flattened gradients."""
    import ray.train
    import ray.train.torch

    from training.loop import actor_search, forward_backward, local_slice, share_weight
    from training.modules import build_train_module

    cfg, examples = loop_config["config"], loop_config["examples"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    module = build_train_module(cfg.models, cfg.mode, cfg.train_doc_encoder).eval()  # no dropout
    model = ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": True})
    share = local_slice(list(range(len(examples))), rank, world)
    forward_backward(
        model,
        actor_search(loop_config["shard_group"]),
        [examples[i] for i in share],
        cfg.n_docs,
        share_weight(len(share), world, len(examples)),
    )
    if rank == 0:
        np.save(loop_config["out"], flat_grads(module))
    ray.train.report({"done": 1})


def flat_grads(module: torch.nn.Module) -> np.ndarray:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()]
    ).numpy()


def test_two_worker_ddp_gradients_equal_full_batch(toy, toy_index, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.shard_group import ShardGroup, ShardGroupConfig
    from training.data import load_qa
    from training.loop import actor_search, forward_backward
    from training.modules import build_train_module

    cfg = config_from_dict(toy.raw_config(tmp_path, train_doc_encoder=True, index={"root": str(toy_index)}))
    examples = load_qa(toy.train)[:5]  # odd on purpose: shares of 3 and 2
    group = (
        ray.remote(ShardGroup)
        .options(max_concurrency=4, num_cpus=0)
        .remote(ShardGroupConfig(index_root=str(toy_index), shard_cpus=0))
    )
    try:
        out = tmp_path / "ddp.npy"
        TorchTrainer(
            _gradient_probe,
            scaling_config=ScalingConfig(num_workers=2),
            train_loop_config={"config": cfg, "examples": examples, "shard_group": group, "out": str(out)},
            run_config=RunConfig(name="ddp", storage_path=str(tmp_path / "runs")),
        ).fit()
        reference = build_train_module(cfg.models, cfg.mode, cfg.train_doc_encoder).eval()
        forward_backward(reference, actor_search(group), examples, cfg.n_docs, 1.0)
    finally:
        ray.get(group.close.remote())
    expected, got = flat_grads(reference), np.load(out)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_n_docs_larger_than_index_is_refused(toy, toy_index, tmp_path):
    cfg = config_from_dict(toy.raw_config(tmp_path, n_docs=33, index={"root": str(toy_index)}))
    with pytest.raises(ValueError, match=r"n_docs=33 is larger than index v0001 .* \(32 passages\)"):
        prepare_index(cfg)


def test_record_without_answer_is_refused_before_workers(toy, toy_index, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "apple?", "answers": ["red"]}\n{"question": "river?", "answers": []}\n')
    cfg = config_from_dict(toy.raw_config(tmp_path, data={"train": str(bad)}, index={"root": str(toy_index)}))
    with pytest.raises(ValueError, match="line 2 has no answers"):
        run_training(cfg)


def test_resuming_from_another_models_checkpoint_is_refused(toy, tmp_path):
    from services.rag.checkpoint import TrainState
    from training.checkpoint import save_checkpoint

    cfg = config_from_dict(toy.raw_config(tmp_path))
    old = tmp_path / "runs" / "toy" / "step-000003"
    save_checkpoint(
        old,
        {},
        None,
        TrainState(
            3,
            "v0001",
            {"query_encoder": toy.encoder, "doc_encoder": toy.encoder, "generator": "another-generator"},
        ),
    )
    with pytest.raises(ValueError, match="incompatible checkpoint .* generator='another-generator'"):
        run_training(cfg)
