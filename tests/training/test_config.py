"""Training config: YAML → typed pydantic models, errors that name the key, the refresh schedule."""

from __future__ import annotations

import pytest
import yaml

from training.config import RefreshSchedule, load_config


@pytest.fixture()
def raw(tmp_path) -> dict:
    (tmp_path / "train.jsonl").write_text('{"question": "q?", "answers": ["a"]}\n')
    return {
        "name": "toy",
        "storage_path": str(tmp_path / "runs"),
        "data": {"train": "train.jsonl"},
        "index": {"root": str(tmp_path / "index"), "corpus": "default"},
        "schedule": {"steps": 10, "batch_size": 4, "checkpoint_every": 5},
        "optimizer": {"lr": "3e-4"},
        "scaling": {"num_workers": [1, 2]},
        "refresh": "0-4:2,4-:3",
    }


def write(tmp_path, raw: dict):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_loads_typed_values_and_resolves_data_paths(tmp_path, raw):
    cfg = load_config(write(tmp_path, raw))
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.scaling.elastic and cfg.scaling.worker_range == (1, 2)
    assert cfg.data.train == str(tmp_path / "train.jsonl")
    assert cfg.mode == "sequence" and cfg.n_docs == 5 and not cfg.train_doc_encoder
    assert cfg.task == "qa"


def test_task_and_article_split_of_the_data(tmp_path, raw):
    (tmp_path / "squad.json").write_text('{"data": []}')
    cfg = load_config(write(tmp_path, raw | {"task": "qgen", "data": {"train": "squad.json:train"}}))
    assert cfg.task == "qgen" and cfg.data.train == f"{tmp_path / 'squad.json'}:train"
    cfg = load_config(write(tmp_path, raw | {"data": {"train": "squad-dev:test", "eval": "squad-dev"}}))
    assert (cfg.data.train, cfg.data.eval) == ("squad-dev:test", "squad-dev")


def _leaves(raw: dict, prefix: tuple[str, ...] = ()):
    """(key path, value) of every scalar or list in a YAML mapping."""
    for key, value in raw.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def test_example_config_loads_every_value_it_writes():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "train.yaml"
    cfg = load_config(example)
    leaves = list(_leaves(yaml.safe_load(example.read_text())))
    assert len(leaves) > 20
    for path, written in leaves:
        loaded = cfg
        for key in path:  # a key written by its alias (index.root) names the field that holds it
            names = {field.alias: name for name, field in type(loaded).model_fields.items() if field.alias}
            loaded = getattr(loaded, names.get(key, key))
        assert (list(loaded) if isinstance(written, list) else loaded) == written, ".".join(path)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("schedule", "steps"), None, "missing config key 'schedule.steps'"),
        (("data", "train"), None, "missing config key 'data.train'"),
        (("schedule", "steps"), "ten", "config key 'schedule.steps' has a bad value 'ten'"),
        (("schedule", "batch_size"), 0, "'schedule.batch_size' must be >= 1"),
        (("mode",), "beam", "config key 'mode' must be 'sequence' or 'token', got 'beam'"),
        (("task",), "jeopardy", "config key 'task' must be 'qa', 'qgen' or 'classify', got 'jeopardy'"),
        (("data", "train"), "nope.json:test", "config key 'data.train': no such file '.*/nope.json'"),
        (("n_docs",), 0, "config key 'n_docs' must be >= 1"),
        (("refresh",), "0-10", "config key 'refresh': bad range '0-10'"),
        (("scaling", "num_workers"), [2, 1], "config key 'scaling.num_workers'"),
        (("optimizer", "lr"), -1, "config key 'optimizer.lr' must be > 0"),
        (("optimizer", "momentum"), 0.9, "unknown config key 'optimizer.momentum'"),
        (("data", "eval"), "nope.jsonl", "config key 'data.eval': no such file"),
        (("schedule",), "steps", "config key 'schedule' must be a mapping"),
    ],
)
def test_bad_config_names_the_key(tmp_path, raw, path, value, message):
    section = raw
    for key in path[:-1]:
        section = section[key]
    if value is None:
        del section[path[-1]]
    else:
        section[path[-1]] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(write(tmp_path, raw))


def test_refresh_schedule_steps():
    schedule = RefreshSchedule.parse("0-1000:100,1000-:500")
    hits = [s for s in range(1, 2600) if schedule.is_refresh_step(s)]
    assert hits == list(range(100, 1001, 100)) + [1500, 2000, 2500]
    assert not any(RefreshSchedule.parse("").is_refresh_step(s) for s in range(1, 100))


@pytest.mark.parametrize("spec", ["0-:10,5-:2", "10-5:1", "0-10:0", "a-b:c"])
def test_refresh_schedule_rejects(spec):
    with pytest.raises(ValueError, match="config key 'refresh'"):
        RefreshSchedule.parse(spec)


def test_refresh_ranges_hold_their_end_not_their_start():
    """A range START-END covers START < step <= END: its end step refreshes, its start does not."""
    schedule = RefreshSchedule.parse("10-20:5,20-30:10")
    assert [s for s in range(1, 40) if schedule.is_refresh_step(s)] == [15, 20, 30]


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"variant": "sequence"}, "unknown config key 'variant'"),
        ({"index": {"root": "r", "shard_cpus": -1}}, "config key 'index.shard_cpus' must be >= 0"),
        ({"scaling": {"num_workers": "two"}}, "config key 'scaling.num_workers': must be n >= 1"),
        ({"name": "a b"}, "config key 'name' has a bad value 'a b'"),
    ],
)
def test_one_line_error_names_the_key(tmp_path, raw, patch, message):
    with pytest.raises(ValueError, match=message) as caught:
        load_config(write(tmp_path, raw | patch))
    assert "\n" not in str(caught.value) and "more)" not in str(caught.value)


def test_eval_config_defaults_to_fast_decoding_and_names_bad_keys():
    from training.evaluate import EvalConfig

    assert EvalConfig().decode.decoding == "fast" and EvalConfig().n_docs == (1, 2, 5)
    assert EvalConfig().decode.max_new_tokens == 16  # eval's short answers, the rest as DecodingConfig
    with pytest.raises(ValueError, match="config key 'n_docs.1' must be > 0, got 0"):
        EvalConfig.parse({"n_docs": [1, 0]})
    with pytest.raises(ValueError, match="config key 'settings.0' must be"):
        EvalConfig.parse({"settings": ["open_book"]})
