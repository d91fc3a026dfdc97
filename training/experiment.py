"""`rayrag experiment`: the paper's Table 1 and index hot-swap at small scale, one command, one report.

SQuAD dev is split by article into training and test articles (listed in the config). The corpus
is every paragraph of every article plus distractor passages, so retrieval is open-domain. The
stages run in order; each writes `stages/NAME.json` under the output folder, and a re-run skips
the finished ones (training resumes from its last checkpoint):

1. data: train.jsonl (training articles' questions), test.jsonl (a seeded sample of the test
   articles' questions), corpus files with and without the test articles' paragraphs;
2. index: the passages encoded once, then two versions of one index root: "mismatched" without
   the test paragraphs, "matching" with them (published);
3. zero_shot: the shipped models, closed-book and RAG-Sequence (retriever recall before);
4. train_rag / train_closed_book: `rayrag train` runs with the same data, steps and batch; the
   closed-book one reads one empty passage per question;
5. fine_tuned: RAG-Token, RAG-Sequence and the top-1 passage read (retriever recall after);
6. closed_book: the closed-book-trained generator;
7. swap: the fine-tuned RAG model with the shard group swapped to "mismatched", then back to
   "matching" (`ShardGroup.swap`, what serving does; no rebuild);
8. retrievers: recall@k of the dense (fine-tuned query encoder), BM25 and hybrid retrievers on the
   same test questions;
9. the `ablations` asked for (the paper's Table 6), each a training run and its RAG-Sequence row:
   bm25 (the generator fine-tuned with BM25's passages, BM25 scores as p(z|x)'s logits), frozen
   (dense retrieval, the query encoder not trained), hybrid (dense and BM25 fused).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, model_validator

from cluster.passages import load_corpus, passage_text, squad_articles, squad_dev_path
from services.rag.config import DecodingConfig, ModelsConfig
from services.rag.loading import load_rag
from services.rag.model import RagModel
from training.config import Section, TrainConfig, config_from_dict
from training.data import BUILTIN_QA, QAExample, load_qa, squad_qa_by_article
from training.presets import preset_path

logger = logging.getLogger(__name__)
Ablation = Literal["bm25", "frozen", "hybrid"]
ABLATIONS: dict[str, dict[str, Any]] = {  # the training keys each ablation run sets
    "bm25": {"retrieval": {"retriever": "bm25"}},
    "frozen": {"train_query_encoder": False},
    "hybrid": {"retrieval": {"retriever": "hybrid"}},
}
GREEDY = {"num_beams": 1, "max_new_tokens": 16, "decoding": "thorough"}  # the experiment's eval decoding
STAGES = (
    *("data", "index", "zero_shot", "train_rag", "train_closed_book", "fine_tuned", "closed_book", "swap"),
    "retrievers",
    *(stage for name in ABLATIONS for stage in (f"train_{name}", name)),
)


class ExperimentData(Section):
    """Where the questions and passages come from, and the fixed split by article."""

    squad: str = BUILTIN_QA  # SQuAD-format .json ("squad-dev": SQuAD v1.1 dev)
    test_articles: tuple[str, ...] = Field(min_length=1)  # titles as in the file; the rest train
    test_questions: int = Field(300, ge=1)  # a seeded sample of the test articles' questions
    train_questions: int | None = Field(None, ge=1)  # a seeded sample for training (None: all)
    distractors: str = "default"  # a corpus spec whose passages join the articles' paragraphs
    distractor_limit: int | None = Field(None, ge=1)
    seed: int = 0


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
        reserved = {"name", "storage_path", "data", "index", "models", "closed_book"} & set(self.train)
        if reserved:
            raise ValueError(f"config key 'train' must not set {sorted(reserved)}: the experiment does")
        for closed_book in (False, True):  # every key checked before anything runs
            self.train_config(Path("."), closed_book, train_data=BUILTIN_QA)
        for ablation in self.ablations:
            self.train_config(Path("."), False, train_data=BUILTIN_QA, ablation=ablation)
        return self

    def train_config(
        self, out: Path, closed_book: bool, train_data: str | None = None, ablation: str | None = None
    ) -> TrainConfig:
        """The `rayrag train` config of the RAG run, the closed-book run, or an ablation's run."""
        raw = {
            **self.train,
            **ABLATIONS.get(ablation or "", {}),
            "name": ablation or ("closed_book" if closed_book else "rag"),
            "storage_path": str(out / "runs"),
            "data": {"train": train_data or str(out / "data" / "train.jsonl")},
            "index": {
                "root": str(out / "index"),
                "corpus": str(out / "data" / "corpus.jsonl"),
                "shard_cpus": 0,
            },
            "models": self.models.model_dump(),
            "closed_book": closed_book,
        }
        if closed_book:
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


# ---- stage 1: data ----


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _qa_rows(examples: list[QAExample]) -> list[dict]:
    return [{"question": e.input, "answers": list(e.answers)} for e in examples]


def sample_questions(examples: list[QAExample], count: int | None, seed: int) -> list[QAExample]:
    """`count` examples drawn without replacement (all of them when None or too few), in file order."""
    if count is None or count >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), count, replace=False))
    return [examples[i] for i in keep]


def write_data(cfg: ExperimentData, folder: Path) -> dict:
    """The question files and both corpus files; returns their counts."""
    source = squad_dev_path() if cfg.squad == BUILTIN_QA else Path(cfg.squad)
    articles = squad_articles(source)
    titles = [a.get("title", "") for a in articles]
    unknown = sorted(set(cfg.test_articles) - set(titles))
    if unknown:
        raise ValueError(f"config key 'data.test_articles': no such articles {unknown} in {str(source)!r}")
    held_out = set(cfg.test_articles)
    train, test = [], []
    for title, examples in squad_qa_by_article(source):
        (test if title in held_out else train).extend(examples)
    folder.mkdir(parents=True, exist_ok=True)
    train = sample_questions(train, cfg.train_questions, cfg.seed)
    test = sample_questions(test, cfg.test_questions, cfg.seed)
    _write_jsonl(folder / "train.jsonl", _qa_rows(train))
    _write_jsonl(folder / "test.jsonl", _qa_rows(test))
    distractors = [
        {"title": p.title, "text": p.text} for p in load_corpus(cfg.distractors, cfg.distractor_limit)
    ]

    def paragraphs(test_side: bool) -> list[dict]:
        return [
            {"title": article["title"].replace("_", " "), "text": paragraph["context"]}
            for article in articles
            if (article["title"] in held_out) == test_side
            for paragraph in article.get("paragraphs", [])
        ]

    # The test paragraphs come last: the corpus without them is a prefix of the one with them.
    without_test = distractors + paragraphs(test_side=False)
    _write_jsonl(folder / "corpus_without_test.jsonl", without_test)
    _write_jsonl(folder / "corpus.jsonl", without_test + paragraphs(test_side=True))
    return {
        "train_questions": len(train),
        "test_questions": len(test),
        "train_articles": len(articles) - len(held_out),
        "test_articles": len(held_out),
        "passages": len(load_corpus(str(folder / "corpus.jsonl"))),
        "passages_without_test": len(load_corpus(str(folder / "corpus_without_test.jsonl"))),
    }


# ---- stage 2: index ----


def build_versions(folder: Path, index_root: Path, doc_encoder: str) -> dict:
    """Encode the full corpus once; write the version without the test paragraphs (a prefix of the
    passages) and the full one, which is published."""
    from cluster.encode_pool import encode_on_ray
    from cluster.index_build import build_index_from_vectors

    passages = load_corpus(str(folder / "corpus.jsonl"))
    prefix = len(load_corpus(str(folder / "corpus_without_test.jsonl")))
    vectors, (encoder, _, fingerprint) = encode_on_ray([passage_text(p) for p in passages], doc_encoder)

    def version(count: int, publish: bool) -> str:
        return build_index_from_vectors(
            vectors[:count],
            passages[:count],
            index_root,
            encoder=encoder,
            encoder_fingerprint=fingerprint,
            publish=publish,
        )

    return {"mismatched": version(prefix, publish=False), "matching": version(len(passages), publish=True)}


# ---- stages 3-7: evaluation ----


def evaluate_settings(
    rag: RagModel,
    group: Any,
    examples: list[QAExample],
    cfg: ExperimentEval,
    rows: dict[str, tuple[int, ...]],
    retrieval: dict | None = None,
) -> dict:
    """`rayrag eval`'s report for each setting at its n_docs (a row each; closed-book reads one empty
    passage), all with the same decoding; `retrieval` a RetrievalConfig's keys (default: dense)."""
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
        part = evaluate(rag, group, examples, eval_cfg, group.manifest.count)
        report = part | {"settings": report.get("settings", {}) | part["settings"]}
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
    rag: RagModel, group: Any, examples: list[QAExample], cfg: ExperimentEval, versions: dict
) -> dict:
    """RAG-Sequence with the index swapped to the version without the test paragraphs, then back."""
    rows = {}
    for name in ("mismatched", "matching"):
        group.swap(versions[name])
        rows[name] = evaluate_settings(rag, group, examples, cfg, {"rag_sequence": (cfg.n_docs,)})
        rows[name]["version"] = group.version
    return rows


def retriever_recall(rag: RagModel, group: Any, examples: list[QAExample], cfg: ExperimentEval) -> dict:
    """recall@1/5/10 (in [0, 1]) of each retriever on the same questions."""
    from cluster.fusion import RetrievalConfig
    from training.evaluate import retrieval_recall, retrieve

    questions, k = [e.input for e in examples], min(10, group.manifest.count)
    recall = {}
    for name in ("dense", "bm25", "hybrid"):
        found = retrieve(rag, group, questions, k, cfg.batch_size, RetrievalConfig(retriever=name))
        recall[name] = {str(r): v for r, v in retrieval_recall(found, examples, (1, 5, 10)).items()}
    return {"recall": recall}


class _Stopped(Exception):
    """Raised when the `until` stage is done, with its result; `Experiment.run` catches it."""

    def __init__(self, result: dict) -> None:
        super().__init__(result)
        self.result = result


class Experiment:
    """Runs the stages in order (up to `until` when given); a finished stage's result is read back
    instead of re-run."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, until: str | None = None) -> None:
        if until is not None and until not in cfg.stages:
            raise ValueError(f"unknown stage {until!r} to stop after: expected one of {list(cfg.stages)}")
        self.cfg, self.out, self.until = cfg, Path(out).resolve(), until
        self.stages_dir = self.out / "stages"
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        (self.out / "experiment.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        )

    def stage(self, name: str, run: Callable[[], dict]) -> dict:
        path = self.stages_dir / f"{name}.json"
        if path.is_file():
            logger.info(f"[experiment] {name}: done before, read from {path}")
            result = json.loads(path.read_text())
        else:
            stages = self.cfg.stages
            logger.info(f"[experiment] stage {stages.index(name) + 1}/{len(stages)}: {name}")
            began = time.monotonic()
            result = run() | {"seconds": round(time.monotonic() - began, 1)}
            path.write_text(json.dumps(result, indent=1))
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

        cfg, data_dir = self.cfg, self.out / "data"
        results = {"data": self.stage("data", lambda: write_data(cfg.data, data_dir))}
        init_ray()  # $RAY_ADDRESS, else a local Ray; the data stage needs none
        index_root = self.out / "index"
        results["index"] = self.stage(
            "index", lambda: build_versions(data_dir, index_root, cfg.models.doc_encoder)
        )
        test = load_qa(str(data_dir / "test.jsonl"))
        # the evaluations' shard actors reserve no CPU: the training runs in between need them all
        searching = ShardGroupConfig(index_root=str(index_root), shard_cpus=0)
        group = ShardGroup(searching, results["index"]["matching"])
        try:
            results |= self._evaluations(group, test, results["index"])
        finally:
            group.close()
        from training.report import write_report

        return write_report(results, self.out)

    def _evaluations(self, group: Any, test: list[QAExample], versions: dict) -> dict:
        cfg, precision, k = self.cfg, self.cfg.models.precision, self.cfg.eval.n_docs
        results = {
            "zero_shot": self.stage(
                "zero_shot",
                lambda: evaluate_settings(
                    load_rag(cfg.models, precision),
                    group,
                    test,
                    cfg.eval,
                    {"closed_book": (1,), "rag_sequence": (k,)},
                ),
            ),
            "train_rag": self.stage("train_rag", lambda: train_run(cfg.train_config(self.out, False))),
            "train_closed_book": self.stage(
                "train_closed_book", lambda: train_run(cfg.train_config(self.out, True))
            ),
        }
        rag = load_rag(cfg.models, precision, results["train_rag"]["checkpoint"])
        results["fine_tuned"] = self.stage(
            "fine_tuned",
            lambda: evaluate_settings(
                rag, group, test, cfg.eval, {"rag_token": (k,), "rag_sequence": tuple(sorted({1, k}))}
            ),
        )
        results["closed_book"] = self.stage(
            "closed_book",
            lambda: evaluate_settings(
                load_rag(cfg.models, precision, results["train_closed_book"]["checkpoint"]),
                group,
                test,
                cfg.eval,
                {"closed_book": (1,)},
            ),
        )
        results["swap"] = self.stage("swap", lambda: swap_eval(rag, group, test, cfg.eval, versions))
        results["retrievers"] = self.stage("retrievers", lambda: retriever_recall(rag, group, test, cfg.eval))
        for name in cfg.ablations:
            results |= self._ablation(name, group, test)
        return results

    def _ablation(self, name: str, group: Any, test: list[QAExample]) -> dict:
        """An ablation's training run and its RAG-Sequence row, retrieving as it trained."""
        cfg = self.cfg
        run = self.stage(f"train_{name}", lambda: train_run(cfg.train_config(self.out, False, ablation=name)))
        model = load_rag(cfg.models, cfg.models.precision, run["checkpoint"])
        retrieval = ABLATIONS[name].get("retrieval")
        rows = {"rag_sequence": (cfg.eval.n_docs,)}
        row = self.stage(name, lambda: evaluate_settings(model, group, test, cfg.eval, rows, retrieval))
        return {f"train_{name}": run, name: row}
