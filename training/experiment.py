"""`rayrag experiment`: the paper's Table 1, index hot-swap and a counterfactual index in one report.

SQuAD dev is split by article into training, validation and test articles (listed in the config). The
corpus is every paragraph of every article plus distractor passages, so retrieval is open-domain. Every
choice is made on the validation questions; each row is evaluated on validation and, once per final
configuration, on test. Every prediction is written to predictions/SPLIT_STAGE_SETTING.jsonl. The stages
run in order; each writes `stages/NAME.json` with its fingerprint (training/stages.py), and a re-run
reuses a finished stage only when its config, code and inputs are unchanged (`force` redoes one):

1. data: train / validation / test questions, the corpus with, without and counterfactually edited
   for the test articles (training/experiment_data.py);
2. index: the passages encoded once; three versions of one index root: "mismatched" (nothing of the
   test articles, same-title distractors included), "counterfactual", "matching" (published);
3. zero_shot: the shipped models, closed-book and RAG-Sequence, on test only (retriever recall before);
4. train_rag / train_rag_token / train_closed_book: `rayrag train` runs with the same data, steps and
   batch: the RAG-Sequence loss, the RAG-Token loss (as the paper trains each), and one empty passage;
5. fine_tuned: the RAG-Sequence model at K and at K=1 (a test-time ablation, not a trained reader);
6. fine_tuned_token: the RAG-Token model; 7. closed_book: the closed-book-trained generator;
8. swap: the RAG-Sequence model with the shard group swapped to "mismatched", then back to "matching"
   (`ShardGroup.swap`, what serving does; no rebuild);
9. counterfactual: the same with "counterfactual": how often answers follow the edited index;
10. retrievers: recall@k of the dense (fine-tuned query encoder), BM25 and hybrid retrievers;
11. the `ablations` asked for (the paper's Table 6), each a training run and its RAG-Sequence row:
   bm25, frozen (the query encoder not trained), hybrid (dense and BM25 fused).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, model_validator

from cluster.passages import load_corpus, passage_text
from services.rag.config import DecodingConfig, ModelsConfig
from services.rag.loading import load_rag
from services.rag.model import RagModel
from training.config import Section, TrainConfig, config_from_dict
from training.counterfactual import follow_keep_rates
from training.data import BUILTIN_QA, QAExample, load_qa
from training.experiment_data import ExperimentData, write_data
from training.predictions import read_predictions, write_predictions
from training.presets import preset_path
from training.stages import StageStore

logger = logging.getLogger(__name__)
Ablation = Literal["bm25", "frozen", "hybrid"]
ABLATIONS: dict[str, dict[str, Any]] = {  # the training keys each ablation run sets
    "bm25": {"retrieval": {"retriever": "bm25"}},
    "frozen": {"train_query_encoder": False},
    "hybrid": {"retrieval": {"retriever": "hybrid"}},
}
RUNS = {"train_rag": "sequence", "train_rag_token": "token", "train_closed_book": "closed_book"}
GREEDY = {"num_beams": 1, "max_new_tokens": 16, "decoding": "thorough"}  # the experiment's eval decoding
STAGES = (
    *("data", "index", "zero_shot", *RUNS, "fine_tuned", "fine_tuned_token", "closed_book"),
    *("swap", "counterfactual", "retrievers"),
    *(stage for name in ABLATIONS for stage in (f"train_{name}", name)),
)
EVAL_INPUTS = ("data", "index")  # what every evaluation stage reads besides its model
MATCHING_CHECK = 16  # questions re-evaluated after swapping back, compared with the fine-tuned predictions


class ExperimentEval(DecodingConfig):
    """One decoding for every setting, so the rows differ only in model and retrieval (their mode set
    per setting); unless the preset says otherwise, greedy and short: `GREEDY`."""

    batch_size: int = Field(8, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _greedy(cls, raw: Any) -> Any:
        return GREEDY | raw if isinstance(raw, dict) else raw


class ExperimentConfig(Section):
    """A preset (training/presets/*.yaml): data, models, the training keys both runs share, eval."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data: ExperimentData
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    train: dict[str, Any]  # `rayrag train` keys: n_docs, mode, optimizer, schedule, scaling, compute...
    eval: ExperimentEval = Field(default_factory=ExperimentEval)
    ablations: tuple[Ablation, ...] = ()  # Table 6's rows: bm25, frozen, hybrid (a training run each)

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this config runs, in order: STAGES less those of the ablations it does not ask for."""
        skipped = {s for name in ABLATIONS if name not in self.ablations for s in (f"train_{name}", name)}
        return tuple(stage for stage in STAGES if stage not in skipped)

    @model_validator(mode="after")
    def _check_train(self) -> ExperimentConfig:
        reserved = {"name", "storage_path", "data", "index", "models", "closed_book", "mode"} & set(
            self.train
        )
        if reserved:
            raise ValueError(f"config key 'train' must not set {sorted(reserved)}: the experiment does")
        for run in (*RUNS, *(f"train_{name}" for name in self.ablations)):  # every key checked up front
            self.train_config(Path("."), run, train_data=BUILTIN_QA)
        return self

    def train_config(self, out: Path, stage: str, train_data: str | None = None) -> TrainConfig:
        """The `rayrag train` config of a training stage: train_rag (RAG-Sequence loss), train_rag_token
        (RAG-Token loss), train_closed_book, or an ablation's train_NAME (RAG-Sequence)."""
        run = RUNS.get(stage, "sequence")
        ablation = stage.removeprefix("train_") if stage not in RUNS else ""
        raw = {
            **self.train,
            **ABLATIONS.get(ablation, {}),
            "name": stage.removeprefix("train_"),
            "mode": "token" if run == "token" else "sequence",
            "storage_path": str(out / "runs"),
            "data": {"train": train_data or str(out / "data" / "train.jsonl")},
            "index": {
                "root": str(out / "index"),
                "corpus": str(out / "data" / "corpus.jsonl"),
                "shard_cpus": 0,
            },
            "models": self.models.model_dump(),
            "closed_book": run == "closed_book",
        }
        if run == "closed_book":
            raw["n_docs"] = 1
        try:
            return config_from_dict(raw)
        except ValueError as error:
            raise ValueError(f"config key 'train': {error}") from error


def load_experiment(preset: str | None, path: str | None) -> ExperimentConfig:
    """A preset's config (training/presets: cpu, cpu_retrievers, gpu) or your own YAML file's."""
    file = Path(path) if path else preset_path(preset or "")
    if not file.is_file():
        raise ValueError(f"no such experiment config {str(file)!r}")
    return ExperimentConfig.parse(yaml.safe_load(file.read_text()))


# ---- stage 2: index ----


def build_versions(folder: Path, index_root: Path, doc_encoder: str) -> dict:
    """Encode the corpus and the counterfactual test side once; write the version without the test
    articles (the shared prefix), the counterfactual one, and the full one, which is published."""
    from cluster.encode_pool import encode_on_ray
    from cluster.index_build import build_index_from_vectors

    passages = load_corpus(str(folder / "corpus.jsonl"))
    prefix = len(load_corpus(str(folder / "corpus_without_test.jsonl")))
    counterfactual = load_corpus(str(folder / "corpus_counterfactual.jsonl"))
    texts = [passage_text(p) for p in passages + counterfactual[prefix:]]
    vectors, (encoder, _, fingerprint) = encode_on_ray(texts, doc_encoder)
    edited = np.concatenate([vectors[:prefix], vectors[len(passages) :]])

    def version(vecs: np.ndarray, chosen: list, publish: bool) -> str:
        return build_index_from_vectors(
            vecs, chosen, index_root, encoder=encoder, encoder_fingerprint=fingerprint, publish=publish
        )

    return {
        "mismatched": version(vectors[:prefix], passages[:prefix], publish=False),
        "counterfactual": version(edited, counterfactual, publish=False),
        "matching": version(vectors[: len(passages)], passages, publish=True),
    }


# ---- stages 3-11: evaluation ----


def evaluate_settings(
    rag: RagModel,
    group: Any,
    examples: list[QAExample],
    cfg: ExperimentEval,
    rows: dict[str, tuple[int, ...]],
    predictions: tuple[Path, str],
    retrieval: dict | None = None,
) -> dict:
    """`rayrag eval`'s report for each setting at its n_docs (a row each; closed-book reads one empty
    passage), all with the same decoding; `retrieval` a RetrievalConfig's keys (default: dense). Every
    prediction goes to FOLDER/PREFIX_SETTING.jsonl (`predictions` = (FOLDER, PREFIX)), named in the report."""
    from training.evaluate import EvalConfig, evaluate

    report: dict = {}
    for setting, n_docs in rows.items():
        eval_cfg = EvalConfig.parse(
            {
                "n_docs": n_docs,
                "settings": [setting],
                "batch_size": cfg.batch_size,
                "decode": cfg,
                "retrieval": retrieval or {},
            }
        )
        part = evaluate(rag, group, examples, eval_cfg, group.manifest.count, keep_predictions=True)
        written = write_predictions(part, examples, *predictions)
        report = part | {
            "settings": report.get("settings", {}) | part["settings"],
            "predictions": report.get("predictions", {}) | written,
        }
    return report


def train_run(cfg: TrainConfig) -> dict:
    """`rayrag train` with this config; where its checkpoint and loss history are."""
    from training.trainer import run_training

    outcome = run_training(cfg)
    return {
        "checkpoint": outcome.result.checkpoint.path,
        "history": str(outcome.history),
        "loss": (outcome.result.metrics or {}).get("loss"),
    }


def swap_eval(
    rag: RagModel, group: Any, test: list[QAExample], cfg: ExperimentEval, versions: dict, folder: Path
) -> dict:
    """RAG-Sequence with the index swapped to the version without the test articles, then back to the
    matching one, where the first MATCHING_CHECK questions are answered again."""
    rows = {"rag_sequence": (cfg.n_docs,)}
    group.swap(versions["mismatched"])
    mismatched = evaluate_settings(rag, group, test, cfg, rows, (folder, "test_swap_mismatched"))
    mismatched["version"] = group.version
    group.swap(versions["matching"])
    check = evaluate_settings(rag, group, test[:MATCHING_CHECK], cfg, rows, (folder, "check_swap_matching"))
    return {"mismatched": mismatched, "matching": check | {"version": group.version}}


def counterfactual_eval(
    rag: RagModel, group: Any, edited: list[QAExample], cfg: ExperimentEval, versions: dict, folder: Path
) -> dict:
    """RAG-Sequence on the edited test questions with the counterfactual index, then back to matching."""
    group.swap(versions["counterfactual"])
    try:
        rows = {"rag_sequence": (cfg.n_docs,)}
        report = evaluate_settings(rag, group, edited, cfg, rows, (folder, "test_counterfactual"))
        return report | {"version": group.version}
    finally:
        group.swap(versions["matching"])


def follow_rates(rows: list[dict], substituted: list[str | None]) -> dict:
    """follow/keep rates of a prediction file's rows: every test question's (the closed-book file) or
    the edited questions' only (the counterfactual file)."""
    subs = [s for s in substituted if s is not None] if len(rows) != len(substituted) else substituted
    if len(rows) != len(subs):
        raise ValueError(f"{len(rows)} predictions for {len(subs)} counterfactual questions")
    return follow_keep_rates([r["prediction"] for r in rows], [r["gold"] for r in rows], subs)


def retriever_recall(rag: RagModel, group: Any, examples: list[QAExample], cfg: ExperimentEval) -> dict:
    """recall@1/5/10 (in [0, 1]) of each retriever on the same questions, and the per-question hits."""
    from cluster.fusion import RetrievalConfig
    from training.evaluate import recall_hits, retrieve

    questions, k = [e.input for e in examples], min(10, group.manifest.count)
    recall, hits = {}, {}
    for name in ("dense", "bm25", "hybrid"):
        found = retrieve(rag, group, questions, k, cfg.batch_size, RetrievalConfig(retriever=name))
        hits[name] = {str(r): v for r, v in recall_hits(found, examples, (1, 5, 10)).items()}
        recall[name] = {r: sum(v) / max(len(v), 1) for r, v in hits[name].items()}
    return {"recall": recall, "hits": hits}


class _Stopped(Exception):
    """Raised when the `until` stage is done, with its result; `Experiment.run` catches it."""

    def __init__(self, result: dict) -> None:
        super().__init__(result)
        self.result = result


class Experiment:
    """Runs the stages in order (up to `until` when given); a finished stage with the same fingerprint
    is read back, not re-run; `force` names stages to redo."""

    def __init__(
        self, cfg: ExperimentConfig, out: str | Path, until: str | None = None, force: Collection[str] = ()
    ) -> None:
        if until is not None and until not in cfg.stages:
            raise ValueError(f"unknown stage {until!r} to stop after: expected one of {list(cfg.stages)}")
        unknown = sorted(set(force) - set(cfg.stages))
        if unknown:
            raise ValueError(f"--force-stage {unknown}: no such stage; expected some of {list(cfg.stages)}")
        self.cfg, self.out, self.until = cfg, Path(out).resolve(), until
        self.store = StageStore(self.out / "stages", force)
        self.predictions = self.out / "predictions"
        (self.out / "experiment.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        )

    def stage(self, name: str, config: Any, inputs: tuple[str, ...], run: Callable[[], dict]) -> dict:
        """The stage's result, read back when its fingerprint (config, code, inputs) is unchanged."""
        fingerprint = self.store.fingerprint(config, inputs)
        result = self.store.reuse(name, fingerprint)
        if result is not None:
            logger.info(f"[experiment] {name}: done before with the same fingerprint, read back")
        else:
            stages = self.cfg.stages
            logger.info(f"[experiment] stage {stages.index(name) + 1}/{len(stages)}: {name}")
            began = time.monotonic()
            result = run() | {"seconds": round(time.monotonic() - began, 1)}
            self.store.save(name, fingerprint, result)
            logger.info(f"[experiment] {name} finished in {result['seconds'] / 60:.1f} min")
        if name == self.until:
            raise _Stopped(result)
        return result

    def run(self) -> dict:
        """Every stage, then the report (report.json, results.md, plots); returns the summary. With
        `until`: the stages up to it, then {"name", "stopped_after", that stage's result}."""
        try:
            return self._run_stages()
        except _Stopped as stopped:
            return {"name": self.cfg.name, "stopped_after": self.until, self.until: stopped.result}

    def _run_stages(self) -> dict:
        from cluster.runtime import init_ray
        from cluster.shard_group import ShardGroup, ShardGroupConfig
        from training.report import write_report

        began, cfg, data_dir = time.monotonic(), self.cfg, self.out / "data"
        results = {
            "data": self.stage(
                "data", cfg.data.model_dump(mode="json"), (), lambda: write_data(cfg.data, data_dir)
            )
        }
        init_ray()  # $RAY_ADDRESS, else a local Ray; the data stage needs none
        index_root = self.out / "index"
        results["index"] = self.stage(
            "index",
            cfg.models.doc_encoder,
            ("data",),
            lambda: build_versions(data_dir, index_root, cfg.models.doc_encoder),
        )
        splits = {name: load_qa(str(data_dir / f"{name}.jsonl")) for name in ("validation", "test")}
        # the evaluations' shard actors reserve no CPU: the training runs in between need them all
        searching = ShardGroupConfig(index_root=str(index_root), shard_cpus=0)
        group = ShardGroup(searching, results["index"]["matching"])
        try:
            results |= self._evaluations(group, splits, results["index"])
        finally:
            group.close()
        return write_report(results, self.out, wall_minutes=(time.monotonic() - began) / 60)

    def _train(self, stage: str) -> dict:
        """A training stage; forced, it starts afresh rather than resuming the finished run."""
        train_cfg = self.cfg.train_config(self.out, stage)
        run_dir = Path(train_cfg.storage_path) / train_cfg.name

        def fresh_run() -> dict:
            if stage in self.store.force and run_dir.exists():
                shutil.rmtree(run_dir)
            return train_run(train_cfg)

        return self.stage(stage, train_cfg.training_record(), EVAL_INPUTS, fresh_run)

    def _rows(
        self,
        stage: str,
        model: Callable[[], RagModel],
        group: Any,
        splits: dict[str, list[QAExample]],
        rows: dict[str, tuple[int, ...]],
        inputs: tuple[str, ...] = (),
        retrieval: dict | None = None,
    ) -> dict:
        """An evaluation stage: `rows` of one model on each split given (validation and test, or test)."""

        def run() -> dict:
            rag = model()
            return {
                split: evaluate_settings(
                    rag,
                    group,
                    examples,
                    self.cfg.eval,
                    rows,
                    (self.predictions, f"{split}_{stage}"),
                    retrieval,
                )
                for split, examples in splits.items()
            }

        config = {
            "models": self.cfg.models.model_dump(mode="json"),
            "eval": self.cfg.eval.model_dump(mode="json"),
            "rows": rows,
            "retrieval": retrieval,
        }
        return self.stage(stage, config, (*EVAL_INPUTS, *inputs), run)

    def _evaluations(self, group: Any, splits: dict[str, list[QAExample]], versions: dict) -> dict:
        cfg, k = self.cfg, self.cfg.eval.n_docs
        trained = lambda run: lambda: load_rag(cfg.models, checkpoint=results[run]["checkpoint"])
        results = {  # the shipped models as they are: no choice to make, so no validation questions
            "zero_shot": self._rows(
                "zero_shot",
                lambda: load_rag(cfg.models),
                group,
                {"test": splits["test"]},
                {"closed_book": (1,), "rag_sequence": (k,)},
            )
        }
        results |= {run: self._train(run) for run in RUNS}
        results["fine_tuned"] = self._rows(
            "fine_tuned",
            trained("train_rag"),
            group,
            splits,
            {"rag_sequence": tuple(sorted({1, k}))},
            ("train_rag",),
        )
        results["fine_tuned_token"] = self._rows(
            "fine_tuned_token",
            trained("train_rag_token"),
            group,
            splits,
            {"rag_token": (k,)},
            ("train_rag_token",),
        )
        results["closed_book"] = self._rows(
            "closed_book",
            trained("train_closed_book"),
            group,
            splits,
            {"closed_book": (1,)},
            ("train_closed_book",),
        )
        results |= self._index_studies(group, splits["test"], versions, trained("train_rag"), results)
        for name in cfg.ablations:
            results[f"train_{name}"] = self._train(f"train_{name}")
            retrieval = ABLATIONS[name].get("retrieval")
            rows = {"rag_sequence": (k,)}
            results[name] = self._rows(
                name, trained(f"train_{name}"), group, splits, rows, (f"train_{name}",), retrieval
            )
        return results

    def _index_studies(
        self, group: Any, test: list[QAExample], versions: dict, model: Callable[[], RagModel], done: dict
    ) -> dict:
        """swap, counterfactual and retrievers: the RAG-Sequence model on the test questions only."""
        cfg, inputs = self.cfg.eval, (*EVAL_INPUTS, "train_rag", "fine_tuned")
        rag = functools.cache(model)  # loaded once, when a stage needs it
        fine_tuned = read_predictions(
            done["fine_tuned"]["test"]["predictions"]["test_fine_tuned_rag_sequence"]
        )

        def swap() -> dict:
            report = swap_eval(rag(), group, test, cfg, versions, self.predictions)
            again = read_predictions(report["matching"]["predictions"]["check_swap_matching_rag_sequence"])
            same = sum(a["prediction"] == b["prediction"] for a, b in zip(again, fine_tuned))
            report["matching"]["identical_to_fine_tuned"] = same
            return report

        substituted = json.loads((self.out / "data" / "substitutes.json").read_text())

        def counterfactual() -> dict:
            edited = [e for e, s in zip(test, substituted) if s is not None]
            report = counterfactual_eval(rag(), group, edited, cfg, versions, self.predictions)
            files = {
                "rag_sequence": report["predictions"]["test_counterfactual_rag_sequence"],
                "closed_book": done["closed_book"]["test"]["predictions"]["test_closed_book_closed_book"],
            }
            return report | {
                "rates": {name: follow_rates(read_predictions(f), substituted) for name, f in files.items()}
            }

        config = cfg.model_dump(mode="json")
        return {
            "swap": self.stage("swap", config, inputs, swap),
            "counterfactual": self.stage("counterfactual", config, (*inputs, "closed_book"), counterfactual),
            "retrievers": self.stage(
                "retrievers", config, inputs, lambda: retriever_recall(rag(), group, test, cfg)
            ),
        }
