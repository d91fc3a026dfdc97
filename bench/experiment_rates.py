"""The experiment's rates on this machine: seconds per question of each evaluation row, per training step.

First build the preset's data and index: `rayrag experiment --preset cpu --out DIR --until index`. Then

    python bench/experiment_rates.py eval DIR --questions 16 --rows closed_book:1:thorough \
        rag_sequence:5:thorough rag_sequence:5:fast rag_token:5:thorough rag_sequence:1:thorough
    python bench/experiment_rates.py train DIR --steps 3 --stages train_rag train_closed_book

`eval` times `experiment.evaluate_settings` per row (SETTING:K:DECODING) on the first test questions
with the shipped models (or --checkpoint), wall and CPU time (`time.process_time`: the steadier figure
on a shared machine). `train` runs each training stage of the preset with --steps steps under DIR/rates/
and reads each step's seconds from its history. One JSON line per row or stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from cluster.runtime import init_ray


def eval_rates(args: argparse.Namespace) -> None:
    from cluster.shard_group import ShardGroup, ShardGroupConfig
    from services.rag.config import ModelsConfig
    from services.rag.loading import load_rag
    from training.data import load_qa
    from training.experiment import ExperimentEval, evaluate_settings

    out = Path(args.out)
    versions = json.loads((out / "stages" / "index.json").read_text())["result"]
    init_ray()
    group = ShardGroup(ShardGroupConfig(index_root=str(out / "index"), shard_cpus=0), versions["matching"])
    rag = load_rag(ModelsConfig(), checkpoint=args.checkpoint)
    test = load_qa(str(out / "data" / "test.jsonl"))
    predictions = out / "rates" / "predictions"
    warm = ExperimentEval(n_docs=5, batch_size=args.batch_size)
    evaluate_settings(rag, group, test[-8:], warm, {"rag_sequence": (5,)}, (predictions, "warm"))
    try:
        for row in args.rows:
            setting, k, decoding = row.split(":")
            cfg = ExperimentEval(n_docs=int(k), decoding=decoding, batch_size=args.batch_size)
            began, cpu = time.monotonic(), time.process_time()
            evaluate_settings(
                rag,
                group,
                test[: args.questions],
                cfg,
                {setting: (int(k),)},
                (predictions, row.replace(":", "_")),
            )
            wall, cpu = time.monotonic() - began, time.process_time() - cpu
            n = args.questions
            print(
                json.dumps(
                    {"row": row, "questions": n, "wall_s": round(wall / n, 3), "cpu_s": round(cpu / n, 3)}
                )
            )
    finally:
        group.close()


def train_rates(args: argparse.Namespace) -> None:
    from training.experiment import ExperimentConfig, train_run
    from training.presets import preset_path

    out = Path(args.out)
    raw = yaml.safe_load(preset_path(args.preset).read_text())
    raw["train"]["schedule"] |= {"steps": args.steps, "checkpoint_every": args.steps}
    cfg = ExperimentConfig.parse(raw)
    init_ray()
    for stage in args.stages:
        train_cfg = cfg.train_config(out, stage).model_copy(
            update={"storage_path": str(out / "rates" / "runs")}
        )
        began = time.monotonic()
        history = Path(train_run(train_cfg)["history"])
        wall = time.monotonic() - began
        rows = [json.loads(line) for line in history.read_text().splitlines()]
        steps = [row["step_seconds"] for row in rows if "step_seconds" in row]
        line = {
            "stage": stage,
            "step_s": [round(s, 1) for s in steps],
            "median_after_first_s": round(statistics.median(steps[1:] or steps), 2),
            "start_s": round(wall - sum(steps), 1),  # workers, models, index, checkpoint
        }
        print(json.dumps(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True)
    evaluate = commands.add_parser("eval", help="seconds per question of each evaluation row")
    evaluate.add_argument("out", help="an experiment --out folder with its data and index stages")
    evaluate.add_argument("--questions", type=int, default=16)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument(
        "--checkpoint", default=None, help="a training checkpoint (default: shipped models)"
    )
    evaluate.add_argument(
        "--rows", nargs="+", required=True, help="SETTING:K:DECODING, e.g. rag_sequence:5:fast"
    )
    evaluate.set_defaults(run=eval_rates)
    train = commands.add_parser("train", help="seconds per training step of the preset's runs")
    train.add_argument("out", help="an experiment --out folder with its data and index stages")
    train.add_argument("--preset", default="cpu")
    train.add_argument("--steps", type=int, default=3)
    train.add_argument("--stages", nargs="+", default=["train_rag", "train_closed_book"])
    train.set_defaults(run=train_rates)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
