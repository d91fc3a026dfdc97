"""The training package's `rayrag` subcommands: train, eval, export and experiment."""

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
from training import presets

if TYPE_CHECKING:
    from cluster.bootstrap import IndexSpec

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


def _eval_models(checkpoint: str | None, named: ModelsConfig) -> tuple[ModelsConfig, dict | None]:
    """The models to evaluate (the checkpoint's, at the named precision, else the named ones) and the
    trained document encoder's weights when the checkpoint has them."""
    from services.rag.checkpoint import component_weights, read_state

    if not checkpoint:
        return named, None
    state = read_state(checkpoint)
    trained = component_weights(checkpoint, "doc_encoder") if state.doc_encoder_trained else None
    return ModelsConfig(**{**state.models, "precision": named.precision}), trained


def _eval_index(args: argparse.Namespace, doc_encoder: str, out: Path) -> IndexSpec:
    """The index to search: --index-root as it is, or out/index built from --corpus (once; a re-run
    with the same --out searches it again) with the document encoder (trained weights when given)."""
    from cluster.bootstrap import IndexSpec

    if args.index_root:
        return IndexSpec(root=args.index_root, corpus=None)
    return IndexSpec(
        root=str(out / "index"), corpus=args.corpus, corpus_limit=args.corpus_limit, encoder=doc_encoder
    )


def run_eval(args: argparse.Namespace) -> int:
    from cluster.bootstrap import ensure_index
    from cluster.index_store import load_manifest
    from cluster.shard_group import ShardGroup, ShardGroupConfig
    from services.rag.loading import load_rag
    from training.evaluate import EvalConfig, evaluate, summary_line, with_labels, write_plots
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
    models, encoder_state = _eval_models(args.checkpoint, models)
    rag = load_rag(models, checkpoint=args.checkpoint)
    init_ray()
    spec = _eval_index(args, models.doc_encoder, out)
    version = ensure_index(spec, encoder_state)
    group = ShardGroup(ShardGroupConfig(index_root=spec.root), version)
    try:
        report = evaluate(rag, group, examples, cfg, load_manifest(spec.root, version).count)
    finally:
        group.close()
    report["plots"] = write_plots(report, out, args.history)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {out / 'report.json'}; plots: {', '.join(report['plots'])}")
    print(json.dumps(summary_line(report)))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Write the folders; print them, and how to serve them, as one JSON object."""
    from services.rag.checkpoint import read_state
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
    out = Path(args.out)
    line = Experiment(cfg, out, args.until, args.force_stage).run()
    if args.until is None:
        print(f"report: {out / 'report.json'}; table: {out / 'results.md'}")
    print(json.dumps(line))
    return 0


def _add_experiment(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "experiment",
        help="the paper's experiment on SQuAD dev: fine-tune, evaluate held-out articles, hot-swap the index",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=presets.NAMES, help=f"a config shipped in {presets.FOLDER}")
    which.add_argument("--config", help="your own experiment YAML (start from a preset's)")
    parser.add_argument(
        "--out", required=True, help="folder for the data, index, runs and report; re-run to resume"
    )
    parser.add_argument(
        "--until",
        metavar="STAGE",
        default=None,
        help="stop after this stage and print its result instead of the report (e.g. data: the question "
        "and corpus files only, no Ray; an unknown name lists the stages in order)",
    )
    parser.add_argument(
        "--force-stage",
        action="append",
        default=[],
        metavar="STAGE",
        help="redo this stage although it finished (repeatable); the stages that read it then refuse "
        "until forced too",
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
    parser.add_argument(
        "--out", help="folder for report.json, the PNG plots and the --corpus index (reused when re-run)"
    )
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
