"""The experiment's data stage: SQuAD split by article into train, validation and test; the three corpora.

The corpus files share one prefix, so one encoding serves every index version:
- corpus_without_test.jsonl: the distractors not titled as a test article, then the train and validation
  articles' paragraphs (the "mismatched" version: nothing of the test articles);
- corpus.jsonl: that prefix, then the distractors titled as a test article and the test paragraphs;
- corpus_counterfactual.jsonl: that prefix, then the same test-side passages with each test answer span
  replaced by a training answer of its kind (training/counterfactual.py); substitutes.json holds each test
  question's substituted answer (null: not edited).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from cluster.passages import load_corpus, squad_articles, squad_dev_path
from training.config import Section
from training.counterfactual import edit_passages
from training.data import BUILTIN_QA, QAExample, squad_qa_by_article, write_jsonl

SPLITS = ("train", "validation", "test")


class ExperimentData(Section):
    """Where the questions and passages come from, and the fixed split by article."""

    squad: str = BUILTIN_QA  # SQuAD-format .json ("squad-dev": SQuAD v1.1 dev)
    test_articles: tuple[str, ...] = Field(min_length=1)  # titles as in the file
    # every choice is made on these; the articles in neither list train
    validation_articles: tuple[str, ...] = Field(min_length=1)
    test_questions: int = Field(1000, ge=1)  # a seeded sample of the test articles' questions
    validation_questions: int = Field(300, ge=1)  # a seeded sample of the validation articles' questions
    train_questions: int | None = Field(None, ge=1)  # a seeded sample for training (None: all)
    distractors: str = "default"  # a corpus spec whose passages join the articles' paragraphs
    distractor_limit: int | None = Field(None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _disjoint(self) -> ExperimentData:
        both = sorted(set(self.test_articles) & set(self.validation_articles))
        if both:
            raise ValueError(f"config key 'data.validation_articles': {both} are test articles too")
        return self


def _qa_rows(examples: list[QAExample]) -> list[dict]:
    return [{"question": e.input, "answers": list(e.answers)} for e in examples]


def sample_questions(examples: list[QAExample], count: int | None, seed: int) -> list[QAExample]:
    """`count` examples drawn without replacement (all of them when None or too few), in file order."""
    if count is None or count >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), count, replace=False))
    return [examples[i] for i in keep]


def split_questions(cfg: ExperimentData, source: Path) -> dict[str, list[QAExample]]:
    """Each split's seeded sample of its articles' questions."""
    titles = {a.get("title", "") for a in squad_articles(source)}
    for key, named in (
        ("test_articles", cfg.test_articles),
        ("validation_articles", cfg.validation_articles),
    ):
        unknown = sorted(set(named) - titles)
        if unknown:
            raise ValueError(f"config key 'data.{key}': no such articles {unknown} in {str(source)!r}")
    split = {t: "validation" for t in cfg.validation_articles} | {t: "test" for t in cfg.test_articles}
    questions: dict[str, list[QAExample]] = {name: [] for name in SPLITS}
    for title, examples in squad_qa_by_article(source):
        questions[split.get(title, "train")].extend(examples)
    counts = {
        "train": cfg.train_questions,
        "validation": cfg.validation_questions,
        "test": cfg.test_questions,
    }
    return {name: sample_questions(questions[name], counts[name], cfg.seed) for name in SPLITS}


def split_corpus(articles: list[dict], test_articles: tuple[str, ...], distractors: list[dict]) -> tuple:
    """(the passages of everything but the test articles, the test side: distractors titled as a test
    article, then the test articles' paragraphs); titles compared with "_" read as " ", any case."""
    test_titles = {title.replace("_", " ").casefold() for title in test_articles}

    def paragraphs(test_side: bool) -> list[dict]:
        return [
            {"title": article["title"].replace("_", " "), "text": paragraph["context"]}
            for article in articles
            if (article["title"].replace("_", " ").casefold() in test_titles) == test_side
            for paragraph in article.get("paragraphs", [])
        ]

    same_title = [d for d in distractors if d["title"].casefold() in test_titles]
    others = [d for d in distractors if d["title"].casefold() not in test_titles]
    return others + paragraphs(test_side=False), same_title + paragraphs(test_side=True), len(same_title)


def write_data(cfg: ExperimentData, folder: Path) -> dict:
    """The question files, the three corpus files and substitutes.json; returns their counts."""
    source = squad_dev_path() if cfg.squad == BUILTIN_QA else Path(cfg.squad)
    questions = split_questions(cfg, source)
    folder.mkdir(parents=True, exist_ok=True)
    for name, examples in questions.items():
        write_jsonl(folder / f"{name}.jsonl", _qa_rows(examples))
    distractors = [
        {"title": p.title, "text": p.text} for p in load_corpus(cfg.distractors, cfg.distractor_limit)
    ]
    kept, test_side, same_title = split_corpus(squad_articles(source), cfg.test_articles, distractors)
    train_answers = [a for e in questions["train"] for a in e.answers]
    edited, substituted = edit_passages(
        test_side, [e.answers for e in questions["test"]], train_answers, cfg.seed
    )
    write_jsonl(folder / "corpus_without_test.jsonl", kept)
    write_jsonl(folder / "corpus.jsonl", kept + test_side)
    write_jsonl(folder / "corpus_counterfactual.jsonl", kept + edited)
    (folder / "substitutes.json").write_text(json.dumps(substituted, ensure_ascii=False))
    return {
        **{f"{name}_questions": len(examples) for name, examples in questions.items()},
        "test_articles": len(cfg.test_articles),
        "validation_articles": len(cfg.validation_articles),
        "train_articles": len(squad_articles(source)) - len(cfg.test_articles) - len(cfg.validation_articles),
        "passages": len(load_corpus(str(folder / "corpus.jsonl"))),
        "passages_without_test": len(load_corpus(str(folder / "corpus_without_test.jsonl"))),
        "test_title_distractors": same_title,
        "counterfactual_questions": sum(s is not None for s in substituted),
    }
