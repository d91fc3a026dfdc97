"""`rayrag train`, `eval`, `experiment` and `export`: the training package's subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.flags import add_config_flags, flag_values
from cluster.fusion import RetrievalConfig
from cluster.runtime import init_ray
from services.rag.config import DecodingConfig, ModelsConfig

if TYPE_CHECKING:
    from training.modules import RagTrainModule

EVAL_DECODING = ("num_beams", "max_new_tokens", "decoding")  # each row's n_docs and mode are its own


def show_progress() -> None:
    """Progress lines (the stages, every few evaluation batches) on the console."""
    logging.basicConfig(format="%(message)s", level=logging.INFO)


def run_train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.trainer import run_training

    cfg = load_config(args.config)  # every config error surfaces here, before Ray starts
    init_ray()
    outcome = run_training(cfg)
    metrics = outcome.result.metrics or {}
    checkpoint = outcome.result.checkpoint
    print(
        json.dumps(
            {
                "name": cfg.name,
                "step": metrics.get("step"),
                "loss": metrics.get("loss"),
                "index_version": metrics.get("index_version"),
                "checkpoint": checkpoint.path if checkpoint else None,
                "history": str(outcome.history),
                "refreshes": outcome.refresh["refreshes"],
            }
        )
    )
    return 0


def _eval_index(args: argparse.Namespace, module: RagTrainModule, doc_encoder: str, out: Path) -> str:
    """The index root to search: --index-root, or a fresh one built from --corpus under out/ with
    the document encoder (the checkpoint's trained weights when it has them)."""
    if args.index_root:
        return args.index_root
    from cluster.index_build import build_index
    from cluster.passages import load_corpus

    state = None
    if module.doc_encoder is not None:
        state = {k: v.detach().cpu() for k, v in module.doc_encoder.state_dict().items()}
    root = out / "index"
    build_index(
        load_corpus(args.corpus, args.corpus_limit),
        root,
        encoder=doc_encoder,
        encoder_state=state,
        publish=True,
        show_progress=False,
    )
    return str(root)


def run_eval(args: argparse.Namespace) -> int:
    from cluster.index_store import load_manifest, resolve_version
    from cluster.shard_group import ShardGroup, ShardGroupConfig
    from services.rag.precision import resolve_dtype
    from training.evaluate import EvalConfig, evaluate, summary_line, with_labels, write_plots
    from training.modules import build_train_module, load_trained
    from training.tasks import get_task

    cfg = EvalConfig.parse(
        flag_values(args, ("settings", "batch_size", "task"))
        | {
            "n_docs": sorted(set(args.n_docs)),
            "decode": flag_values(args, EVAL_DECODING),
            "retrieval": {"retriever": args.retriever},
        }
    )
    models = ModelsConfig.parse(flag_values(args, ModelsConfig.model_fields))
    show_progress()
    data = get_task(cfg.task).load(args.data)
    cfg = with_labels(cfg, data)  # classify: the label words of the whole file, before --limit
    examples = data[: args.limit]
    out = Path(args.out or tempfile.mkdtemp(prefix="rayrag-eval-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        module, state = load_trained(args.checkpoint)
        doc_encoder = state.models["doc_encoder"]
    else:
        module, doc_encoder = build_train_module(models, "sequence", False).eval(), models.doc_encoder
    module.rag.generator.model.to(resolve_dtype(models.precision))
    init_ray()
    root = _eval_index(args, module, doc_encoder, out)
    group = ShardGroup(ShardGroupConfig(index_root=root))
    try:
        report = evaluate(
            module.rag, group, examples, cfg, load_manifest(root, resolve_version(root, None)).count
        )
    finally:
        group.close()
    report["plots"] = write_plots(report, out, args.history)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {out / 'report.json'}; plots: {', '.join(report['plots'])}")
    print(json.dumps(summary_line(report)))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Write the folders; print them, and how to serve them, as one JSON object."""
    from training.checkpoint import read_state
    from training.modules import export_models

    folders = export_models(args.checkpoint, args.out)
    state = read_state(args.checkpoint)
    serve = f"rayrag serve --generator {folders['generator']} --query-encoder {folders['query_encoder']}"
    if state.doc_encoder_trained:  # its doc vectors live in the version its refresh published
        serve += f" --index-root INDEX_ROOT --index-version {state.index_version}"
    print(json.dumps({**folders, "index_version": state.index_version, "serve": serve}))
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    """Every stage of the experiment (resuming a finished or interrupted one), the report, then its
    summary as the last line."""
    from training.experiment import Experiment, load_experiment

    cfg = load_experiment(args.preset, args.config)  # config errors surface before Ray starts
    show_progress()
    init_ray()
    out = Path(args.out)
    line = Experiment(cfg, out).run()
    print(f"report: {out / 'report.json'}; table: {out / 'results.md'}")
    print(json.dumps(line))
    return 0


def _add_experiment(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "experiment",
        help="the paper's experiment on SQuAD dev: fine-tune, evaluate held-out articles, hot-swap the index",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--preset", choices=("cpu", "cpu_retrievers", "gpu"), help="examples/experiment_<preset>.yaml"
    )
    which.add_argument("--config", help="your own experiment YAML (see examples/experiment_cpu.yaml)")
    parser.add_argument(
        "--out", required=True, help="folder for the data, index, runs and report; re-run to resume"
    )
    parser.set_defaults(run=run_experiment)


def _add_eval(subcommands: argparse._SubParsersAction) -> None:
    from training.evaluate import EvalConfig

    parser = subcommands.add_parser(
        "eval", help="a task's metrics (QA: EM / F1 / recall@k) for closed-book, RAG-Token, RAG-Sequence"
    )
    add_config_flags(parser, EvalConfig, ("task",))
    parser.add_argument(
        "--data",
        "--qa",
        dest="data",
        required=True,
        help="qa and qgen: SQuAD-format .json, JSONL {question, answers}, or squad-dev (SQuAD-format data "
        "may end in :train or :test, an article split); classify: JSONL {claim, label}",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--index-root", help="INDEX_ROOT to search (its published version)")
    where.add_argument("--corpus", help="corpus spec to index first: default | squad-open | PATH")
    parser.add_argument("--corpus-limit", type=int, default=None)
    parser.add_argument("--checkpoint", help="a training checkpoint folder (else the models named below)")
    add_config_flags(parser, ModelsConfig, ModelsConfig.model_fields)
    add_config_flags(parser, EvalConfig, ("n_docs",))
    add_config_flags(parser, RetrievalConfig, ("retriever",))
    add_config_flags(parser, EvalConfig, ("settings",))
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N questions")
    add_config_flags(parser, EvalConfig, ("batch_size",))
    add_config_flags(parser, DecodingConfig, EVAL_DECODING, defaults=EvalConfig().decode)
    parser.add_argument("--history", help="a run's history.jsonl, for the loss-curve plot")
    parser.add_argument("--out", help="folder for report.json and the PNG plots")
    parser.set_defaults(run=run_eval)


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands; each sets `run(args) -> int`."""
    train = subcommands.add_parser("train", help="fine-tune RAG with Ray Train (config: YAML)")
    train.add_argument("--config", required=True, help="training config YAML (see examples/train.yaml)")
    train.set_defaults(run=run_train)
    _add_eval(subcommands)
    _add_experiment(subcommands)
    export = subcommands.add_parser("export", help="a training checkpoint → Hugging Face folders to serve")
    export.add_argument("--checkpoint", required=True, help="a training checkpoint folder")
    export.add_argument(
        "--out", required=True, help="folder for query_encoder/, generator/ (and doc_encoder/)"
    )
    export.set_defaults(run=run_export)
