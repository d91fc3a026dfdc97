"""The experiment's report: report.json, results.md (laid out like the paper's Table 1) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.evaluate import read_history

# (row name, stage, setting, n_docs row or None for the setting's own row)
ROWS = (
    ("Closed-book, zero-shot", "zero_shot", "closed_book", None),
    ("RAG-Sequence, zero-shot", "zero_shot", "rag_sequence", None),
    ("Closed-book, fine-tuned", "closed_book", "closed_book", None),
    ("Top-1 passage read, fine-tuned", "fine_tuned", "rag_sequence", "1"),
    ("RAG-Token, fine-tuned", "fine_tuned", "rag_token", None),
    ("RAG-Sequence, fine-tuned", "fine_tuned", "rag_sequence", None),
)
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


def table_rows(results: dict) -> list[tuple[str, float, float]]:
    """(setting, EM, F1) in percent: Table 1's rows, then the hot-swap pair."""
    rows = [
        (name, _percent(m["em"]), _percent(m["f1"]))
        for name, stage, setting, n_docs in (*ROWS, *ABLATION_ROWS)
        if stage in results
        for m in [_metrics(results[stage], setting, n_docs)]
    ]
    for side, label in (("matching", "with the test articles"), ("mismatched", "without the test articles")):
        m = _metrics(results["swap"][side], "rag_sequence", None)
        rows.append((f"RAG-Sequence, fine-tuned, index {label}", _percent(m["em"]), _percent(m["f1"])))
    return rows


def summary(results: dict) -> dict:
    """The command's last line: EM in percent per setting, recall@5 before/after, minutes."""

    def em(report: str | dict, setting: str, n_docs: str | None = None) -> float:
        report = results[report] if isinstance(report, str) else report
        return _percent(_metrics(report, setting, n_docs)["em"])

    ablations = {
        f"{stage}_em": em(stage, "rag_sequence") for _, stage, _, _ in ABLATION_ROWS if stage in results
    }
    recall = results.get("retrievers", {}).get("recall", {})
    return {
        **ablations,
        **{f"recall_at_5_{name}": _percent(recall[name]["5"]) for name in recall},
        "rag_sequence_em": em("fine_tuned", "rag_sequence"),
        "rag_token_em": em("fine_tuned", "rag_token"),
        "closed_book_em": em("closed_book", "closed_book"),
        "zero_shot_rag_em": em("zero_shot", "rag_sequence"),
        "zero_shot_closed_book_em": em("zero_shot", "closed_book"),
        "top1_read_em": em("fine_tuned", "rag_sequence", "1"),
        "swap_matching_em": em(results["swap"]["matching"], "rag_sequence"),
        "swap_mismatched_em": em(results["swap"]["mismatched"], "rag_sequence"),
        "recall_at_5_before": _percent(results["zero_shot"]["recall"]["5"]),
        "recall_at_5_after": _percent(results["fine_tuned"]["recall"]["5"]),
        "test_questions": results["data"]["test_questions"],
        "minutes": round(sum(stage.get("seconds", 0.0) for stage in results.values()) / 60, 1),
    }


def markdown(results: dict) -> str:
    data = results["data"]
    lines = [
        f"Test: {data['test_questions']} questions of {data['test_articles']} held-out SQuAD dev articles; "
        f"{data['passages']} passages in the index. EM and F1 in percent.",
        "",
        "| Setting | EM | F1 |",
        "|---|---|---|",
        *(f"| {name} | {em:.1f} | {f1:.1f} |" for name, em, f1 in table_rows(results)),
        "",
        "| Retriever | " + " | ".join(f"recall@{k}" for k in RECALL_KS) + " |",
        "|---|" + "---|" * len(RECALL_KS),
    ]
    for label, stage in (("before fine-tuning", "zero_shot"), ("after fine-tuning", "fine_tuned")):
        recall = results[stage]["recall"]
        lines.append(f"| {label} | " + " | ".join(f"{_percent(recall[k]):.1f}" for k in RECALL_KS) + " |")
    for name, recall in results.get("retrievers", {}).get("recall", {}).items():
        label = f"{name} (fine-tuned query encoder)" if name != "bm25" else name
        lines.append(f"| {label} | " + " | ".join(f"{_percent(recall[k]):.1f}" for k in RECALL_KS) + " |")
    return "\n".join(lines) + "\n"


def write_plots(results: dict, out: Path) -> list[str]:
    """loss.png (both training runs), em_f1.png (by setting), recall.png (before/after)."""
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

    rows = table_rows(results)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    positions = range(len(rows))
    axes.barh([p + 0.2 for p in positions], [r[1] for r in rows], height=0.4, label="EM")
    axes.barh([p - 0.2 for p in positions], [r[2] for r in rows], height=0.4, label="F1")
    axes.set_yticks(list(positions), [r[0] for r in rows], fontsize=8)
    axes.invert_yaxis()
    axes.set(xlabel="percent", title="EM and F1 by setting")
    axes.legend()
    save(figure, "em_f1.png")

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for offset, (label, stage) in ((-0.2, ("before", "zero_shot")), (0.2, ("after", "fine_tuned"))):
        values = [_percent(results[stage]["recall"][k]) for k in RECALL_KS]
        axes.bar([i + offset for i in range(len(RECALL_KS))], values, width=0.4, label=f"{label} fine-tuning")
    axes.set_xticks(range(len(RECALL_KS)), [f"recall@{k}" for k in RECALL_KS])
    axes.set(ylabel="percent", title="retriever recall")
    axes.legend()
    save(figure, "recall.png")
    return written


def write_report(results: dict, out: Path) -> dict:
    """Write report.json, results.md and the plots under `out`; returns the summary line."""
    line = summary(results)
    (out / "results.md").write_text(markdown(results))
    plots = write_plots(results, out)
    (out / "report.json").write_text(json.dumps({"summary": line, "plots": plots, **results}, indent=1))
    return line
