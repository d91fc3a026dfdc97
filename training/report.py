"""The experiment's report: report.json, results.md (laid out like the paper's Table 1) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.evaluate import read_history
from training.predictions import cells, paired, read_predictions
from training.stats import interval

# (row name, stage, setting, n_docs row or None for the setting's own row)
ROWS = (
    ("Closed-book, zero-shot", "zero_shot", "closed_book", None),
    ("RAG-Sequence, zero-shot", "zero_shot", "rag_sequence", None),
    ("Closed-book, fine-tuned", "closed_book", "closed_book", None),
    (
        "Top-1 passage read: the RAG-Sequence model at K=1 (test-time ablation)",
        "fine_tuned",
        "rag_sequence",
        "1",
    ),
    ("RAG-Token, fine-tuned (RAG-Token loss)", "fine_tuned_token", "rag_token", None),
    ("RAG-Sequence, fine-tuned", "fine_tuned", "rag_sequence", None),
)
REFERENCE = ROWS[-1]  # the row every other is tested against
ABLATION_ROWS = (  # the paper's Table 6, when the experiment ran them
    ("RAG-Sequence, BM25 retriever, fine-tuned", "bm25", "rag_sequence", None),
    (
        "RAG-Sequence, frozen retriever (query encoder not trained), fine-tuned",
        "frozen",
        "rag_sequence",
        None,
    ),
    ("RAG-Sequence, hybrid retriever (dense and BM25 fused), fine-tuned", "hybrid", "rag_sequence", None),
)
TRAIN_RUNS = {  # the loss plot's lines, when the experiment has the run
    "train_rag": "RAG-Sequence",
    "train_rag_token": "RAG-Token",
    "train_closed_book": "closed-book",
    **{f"train_{name}": f"{name} retriever" for name in ("bm25", "frozen", "hybrid")},
}
RECALL_KS = ("1", "5", "10")
SMOOTHING = 10  # steps in the loss plot's running mean


def _metrics(report: dict, setting: str, n_docs: str | None) -> dict:
    row = report["settings"][setting]
    return row["by_n_docs"][n_docs] if n_docs else row


def _percent(value: float) -> float:
    return round(100 * value, 1)


def _interval(cell: dict) -> list[float]:
    return [_percent(v) for v in cell["ci95"]]


def prediction_file(report: dict, split: str, stage: str, setting: str, n_docs: str | None) -> str:
    """The predictions file of a row (training/predictions.py names them)."""
    widest = max(report["settings"][setting]["by_n_docs"], key=int)
    narrower = n_docs is not None and n_docs != widest
    return report["predictions"][f"{split}_{stage}_{setting}" + (f"_k{n_docs}" if narrower else "")]


def row_stats(results: dict) -> list[dict]:
    """Each row of the table: validation EM/F1, test EM/F1/answer-in-passages with 95% intervals, and the
    paired test against RAG-Sequence on the same test questions."""
    reference, rows = _reference(results), []
    for name, stage, setting, n_docs in (*ROWS, *ABLATION_ROWS):
        if stage not in results:
            continue
        test = read_predictions(prediction_file(results[stage]["test"], "test", stage, setting, n_docs))
        validation = results[stage].get("validation")  # none for the zero-shot rows
        if validation is not None:
            validation = {
                k: _percent(v) for k, v in _metrics(validation, setting, n_docs).items() if k in ("em", "f1")
            }
        is_reference = (name, stage, setting, n_docs) == REFERENCE
        rows.append(
            {"name": name, "validation": validation} | _test_row(test, None if is_reference else reference)
        )
    return rows


def _reference(results: dict) -> list[dict]:
    _, stage, setting, n_docs = REFERENCE
    return read_predictions(prediction_file(results[stage]["test"], "test", stage, setting, n_docs))


def _test_row(rows: list[dict], reference: list[dict] | None) -> dict:
    """The test cells of a prediction file's rows, and the paired test against the reference."""
    row = {"test": {k: {"mean": _percent(c["mean"]), "ci95": _interval(c)} for k, c in cells(rows).items()}}
    if reference is not None:
        row["vs_rag_sequence"] = paired(reference, rows)
    return row


def swap_row(results: dict) -> dict:
    """The RAG-Sequence model with the index swapped to the version without the test articles."""
    files = results["swap"]["mismatched"]["predictions"]
    mismatched = read_predictions(files["test_swap_mismatched_rag_sequence"])
    name = "RAG-Sequence, fine-tuned, index swapped to the version without the test articles"
    return {"name": name} | _test_row(mismatched, _reference(results))


def summary(results: dict, rows: list[dict], wall_minutes: float) -> dict:
    """The command's last line: EM in percent per setting (with 95% intervals for the main rows), the
    paired p-values, the counterfactual rates, recall@5 before/after, question counts and minutes."""

    def em(report: str | dict, setting: str, n_docs: str | None = None) -> float:
        report = results[report]["test"] if isinstance(report, str) else report
        return _percent(_metrics(report, setting, n_docs)["em"])

    by_name = {row["name"]: row for row in rows}
    label = {stage + setting + str(n_docs): name for name, stage, setting, n_docs in (*ROWS, *ABLATION_ROWS)}
    row = lambda stage, setting, n_docs=None: by_name[label[stage + setting + str(n_docs)]]
    ablations = {
        f"{stage}_em": em(stage, "rag_sequence") for _, stage, _, _ in ABLATION_ROWS if stage in results
    }
    recall = results.get("retrievers", {}).get("recall", {})
    rates = results["counterfactual"]["rates"]
    stage_minutes = {
        name: round(r.get("seconds", 0.0) / 60, 1) for name, r in results.items() if isinstance(r, dict)
    }
    return {
        **ablations,
        **{f"recall_at_5_{name}": _percent(recall[name]["5"]) for name in recall},
        "rag_sequence_em": em("fine_tuned", "rag_sequence"),
        "rag_token_em": em("fine_tuned_token", "rag_token"),
        "closed_book_em": em("closed_book", "closed_book"),
        "zero_shot_rag_em": em("zero_shot", "rag_sequence"),
        "zero_shot_closed_book_em": em("zero_shot", "closed_book"),
        "top1_read_em": em("fine_tuned", "rag_sequence", "1"),
        "swap_matching_em": em("fine_tuned", "rag_sequence"),  # the same model, index version and decoding
        "swap_mismatched_em": em(results["swap"]["mismatched"], "rag_sequence"),
        "recall_at_5_before": _percent(results["zero_shot"]["test"]["recall"]["5"]),
        "recall_at_5_after": _percent(results["fine_tuned"]["test"]["recall"]["5"]),
        "rag_sequence_em_ci95": row("fine_tuned", "rag_sequence")["test"]["em"]["ci95"],
        "rag_token_em_ci95": row("fine_tuned_token", "rag_token")["test"]["em"]["ci95"],
        "closed_book_em_ci95": row("closed_book", "closed_book")["test"]["em"]["ci95"],
        "p_rag_seq_vs_token": row("fine_tuned_token", "rag_token")["vs_rag_sequence"]["p"],
        "p_rag_seq_vs_top1": row("fine_tuned", "rag_sequence", "1")["vs_rag_sequence"]["p"],
        "counterfactual_follow_rate": _percent(rates["rag_sequence"]["follow_rate"]),
        "counterfactual_keep_rate": _percent(rates["rag_sequence"]["keep_rate"]),
        "closed_book_counterfactual_follow_rate": _percent(rates["closed_book"]["follow_rate"]),
        "validation_em": row("fine_tuned", "rag_sequence")["validation"]["em"],
        "test_questions": results["data"]["test_questions"],
        "validation_questions": results["data"]["validation_questions"],
        "wall_minutes": round(wall_minutes, 1),
        "minutes": round(wall_minutes, 1),  # wall time of this invocation, as wall_minutes
        "stage_minutes": stage_minutes,
    }


def _cell(cell: dict) -> str:
    low, high = cell["ci95"]
    return f"{cell['mean']:.1f} [{low:.1f}, {high:.1f}]"


def _p(row: dict) -> str:
    if "vs_rag_sequence" not in row:
        return "(reference)"
    test = row["vs_rag_sequence"]
    low, high = (_percent(v) for v in test["em_difference_ci95"])
    return f"{test['p']:.2g} ({_percent(test['em_difference']):+.1f} [{low:+.1f}, {high:+.1f}])"


def _intro(data: dict) -> str:
    return (
        f"Train: {data['train_questions']} questions of {data['train_articles']} SQuAD dev article(s). "
        f"Validation: {data['validation_questions']} questions of {data['validation_articles']} further "
        f"article(s), every choice is made on these. Test: {data['test_questions']} questions of "
        f"{data['test_articles']} held-out article(s). {data['passages']} passages in the index. EM, F1 and "
        "recall in percent, [95% percentile bootstrap interval over questions, 2,000 resamples]. p: exact "
        "McNemar test on EM against RAG-Sequence, fine-tuned, on the same test questions (beside it, this "
        "row's EM minus RAG-Sequence's, with the paired bootstrap interval of that difference)."
    )


def _table_line(name: str, validation: dict | None, row: dict) -> str:
    test = row["test"]
    recall = _cell(test["recall"]) if "recall" in test else "–"
    val = f"{validation['em']:.1f} | {validation['f1']:.1f}" if validation else "– | –"
    return f"| {name} | {val} | {_cell(test['em'])} | {_cell(test['f1'])} | {recall} | {_p(row)} |"


def _main_table(results: dict, rows: list[dict], swap_row: dict) -> list[str]:
    removed = results["data"]["test_title_distractors"]
    swap_name = (
        f"{swap_row['name']} (removed: every paragraph of the test articles and the {removed} "
        "distractor passages titled as one)"
    )
    return [
        "| Setting | Val EM | Val F1 | Test EM | Test F1 | Test: answer in passages read | p vs RAG-Seq |",
        "|---|---|---|---|---|---|---|",
        *(_table_line(row["name"], row["validation"], row) for row in rows),
        _table_line(swap_name, None, swap_row),
    ]


def _index_studies(results: dict) -> list[str]:
    check, rates = results["swap"]["matching"], results["counterfactual"]["rates"]
    checked = len(read_predictions(check["predictions"]["check_swap_matching_rag_sequence"]))
    models = (("rag_sequence", "RAG-Sequence, fine-tuned"), ("closed_book", "Closed-book, fine-tuned"))
    return [
        f"Swapped back to the version with the test articles ({check['version']}): "
        f"{check['identical_to_fine_tuned']} of the first {checked} test questions got the fine-tuned "
        "RAG-Sequence row's prediction again.",
        "",
        "Counterfactual index: in the test articles' passages (and the distractors titled as one) each test "
        "answer span is replaced by a training answer of the same kind (year, number, capitalised name, "
        f"other); {results['data']['counterfactual_questions']} test questions were edited. Follow: the "
        "prediction equals the substituted answer; keep: it equals the original answer.",
        "",
        "| Model | follow | keep |",
        "|---|---|---|",
        *(
            f"| {label} | {100 * rates[key]['follow_rate']:.1f} | {100 * rates[key]['keep_rate']:.1f} |"
            for key, label in models
        ),
    ]


def markdown(results: dict, rows: list[dict], swap_row: dict, line: dict) -> str:
    """results.md: the table with intervals and p-values, the swap and counterfactual rows, recall, times."""
    stages = ", ".join(f"{name} {minutes}" for name, minutes in line["stage_minutes"].items())
    lines = [
        _intro(results["data"]),
        "",
        *_main_table(results, rows, swap_row),
        "",
        *_index_studies(results),
        "",
        *_recall_table(results),
        "",
        f"Wall time of this invocation: {line['wall_minutes']} min. Stage minutes (this or an earlier "
        f"invocation): {stages}.",
    ]
    return "\n".join(lines) + "\n"


def _recall_table(results: dict) -> list[str]:
    """Retriever recall@k on the test questions, each with its 95% interval."""
    lines = [
        "| Retriever (test) | " + " | ".join(f"recall@{k}" for k in RECALL_KS) + " |",
        "|---|" + "---|" * len(RECALL_KS),
    ]
    reports = [
        ("before fine-tuning", results["zero_shot"]["test"]["recall_hits"]),
        ("after fine-tuning", results["fine_tuned"]["test"]["recall_hits"]),
    ]
    for name, hits in results.get("retrievers", {}).get("hits", {}).items():
        reports.append((f"{name} (fine-tuned query encoder)" if name != "bm25" else name, hits))
    for label, hits in reports:
        cells_ = [
            _cell({"mean": _percent(interval(hits[k])["mean"]), "ci95": _interval(interval(hits[k]))})
            for k in RECALL_KS
        ]
        lines.append(f"| {label} | " + " | ".join(cells_) + " |")
    return lines


def write_plots(results: dict, rows: list[dict], out: Path) -> list[str]:
    """loss.png (the training runs), em_f1.png (test EM and F1 by row, 95% intervals as error bars),
    recall.png (before/after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(figure: object, name: str) -> None:
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        written.append(str(out / name))

    figure, axes = plt.subplots(figsize=(6, 3.5))
    for run, label in TRAIN_RUNS.items():
        if run not in results:
            continue
        steps, losses = read_history(results[run]["history"])
        window = min(SMOOTHING, len(losses))
        line = axes.plot(steps, losses, alpha=0.3)[0]
        mean = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1 :], mean, color=line.get_color(), label=f"{label} ({window}-step mean)")
    axes.set(xlabel="step", ylabel="training NLL (nats per answer)", title="training loss")
    axes.legend()
    save(figure, "loss.png")

    figure, axes = plt.subplots(figsize=(8, 4.5))
    positions = np.arange(len(rows))
    for offset, metric in ((0.2, "em"), (-0.2, "f1")):
        means = np.array([r["test"][metric]["mean"] for r in rows])
        spans = np.array([r["test"][metric]["ci95"] for r in rows]).T  # (2, rows)
        errors = np.abs(spans - means)  # (2, rows)
        axes.barh(positions + offset, means, xerr=errors, height=0.4, label=metric.upper(), capsize=2)
    axes.set_yticks(list(positions), [r["name"] for r in rows], fontsize=7)
    axes.invert_yaxis()
    axes.set(xlabel="percent (test, 95% interval)", title="EM and F1 by setting")
    axes.legend()
    save(figure, "em_f1.png")

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for offset, (label, stage) in ((-0.2, ("before", "zero_shot")), (0.2, ("after", "fine_tuned"))):
        values = [_percent(results[stage]["test"]["recall"][k]) for k in RECALL_KS]
        axes.bar([i + offset for i in range(len(RECALL_KS))], values, width=0.4, label=f"{label} fine-tuning")
    axes.set_xticks(range(len(RECALL_KS)), [f"recall@{k}" for k in RECALL_KS])
    axes.set(ylabel="percent", title="retriever recall")
    axes.legend()
    save(figure, "recall.png")
    return written


def write_report(results: dict, out: Path, wall_minutes: float) -> dict:
    """Write report.json, results.md and the plots under `out`; returns the summary line."""
    rows = row_stats(results) + [swap_row(results)]
    line = summary(results, rows, wall_minutes)
    (out / "results.md").write_text(markdown(results, rows[:-1], rows[-1], line))
    plots = write_plots(results, rows, out)
    (out / "report.json").write_text(
        json.dumps({"summary": line, "rows": rows, "plots": plots, **results}, indent=1)
    )
    return line
