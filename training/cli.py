"""`rayrag train`, `eval`, `experiment` and `export`: the training package's subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from cluster.fusion import Retriever
from cluster.runtime import init_ray

if TYPE_CHECKING:
    from training.modules import RagTrainModule


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
    from training.config import ModelsConfig
    from training.evaluate import SETTINGS, EvalConfig, evaluate, summary_line, with_labels, write_plots
    from training.modules import build_train_module, load_trained
    from training.tasks import get_task

    cfg = EvalConfig.parse(
        {
            "n_docs": sorted(set(args.n_docs)),
            "settings": args.settings or SETTINGS,
            "batch_size": args.batch_size,
            "num_beams": args.num_beams,
            "max_new_tokens": args.max_new_tokens,
            "decoding": args.decoding,
            "task": args.task,
            "retrieval": {"retriever": args.retriever},
        }
    )
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
        models = ModelsConfig(
            query_encoder=args.query_encoder, doc_encoder=args.doc_encoder, generator=args.generator
        )
        module, doc_encoder = build_train_module(models, "sequence", False).eval(), args.doc_encoder
    module.rag.generator.model.to(resolve_dtype(args.precision))
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
    line = Experiment(cfg, out, args.force_stage).run()
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
    from training.config import TASKS

    parser = subcommands.add_parser(
        "eval", help="a task's metrics (QA: EM / F1 / recall@k) for closed-book, RAG-Token, RAG-Sequence"
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="qa",
        help="qa: EM/F1; qgen: answer -> question, BLEU-1/ROUGE-L; classify: claim -> label, accuracy",
    )
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
    parser.add_argument("--query-encoder", default="default")
    parser.add_argument("--doc-encoder", default="default")
    parser.add_argument("--generator", default="default")
    parser.add_argument("--n-docs", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument(
        "--retriever", choices=get_args(Retriever), default="dense", help="dense | bm25 | hybrid"
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="some of closed_book rag_token rag_sequence (default: all three)",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N questions")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--decoding",
        choices=("thorough", "fast"),
        default="fast",
        help="RAG-Sequence decoding (thorough: rescore every hypothesis under all K passages)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="generator weights (auto: bfloat16 where the CPU or GPU multiplies it natively)",
    )
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
