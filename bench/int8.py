"""Int8 dynamic quantization of the default generator as a latency lever: its cost and its answers.

`phases`: CPU seconds of the generator's prefill and 31 decoding steps with fixed tokens (the same work
for both weights), float32 against `torch.ao.quantization.quantize_dynamic` on every Linear.
`answers`: the default request (RAG-Sequence "fast", 4 beams, 32 new tokens, K=5, dense) on the
experiment's validation questions over its corpus, one question at a time; one JSONL line each
(resumes a file). `compare`: EM/F1 with 95% bootstrap intervals, the paired tests and the identical
answers of two such files (training/stats.py). One thread, so CPU seconds hold on a shared machine.

    rayrag experiment --preset cpu --out EXP --until data
    python bench/int8.py answers --weights float32 --data EXP/data --out fp32.jsonl
    python bench/int8.py answers --weights int8 --data EXP/data --out int8.jsonl
    python bench/int8.py compare fp32.jsonl int8.jsonl
    python bench/int8.py phases
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from services.rag.generator import Generator  # noqa: E402

PASSAGE = (
    "Adventures of Huckleberry Finn is a novel by American author Mark Twain, first published in the "
    "United Kingdom in December 1884 and in the United States in February 1885. "
) * 2  # a prompt of about the default corpus's passage length


def quantized(generator: Generator) -> Generator:
    """The generator with every Linear (lm_head included) an int8 dynamically quantized one, in place."""
    torch.ao.quantization.quantize_dynamic(
        generator.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
    )
    return generator


def phase_seconds(generator: Generator, passages: int, steps: int = 31) -> tuple[float, float]:
    """CPU seconds of the prefill of `passages` prompts and of `steps` steps of 4 beams each."""
    ctx = generator.contexts(["Who wrote it?"], [["Huckleberry Finn"] * passages], [[PASSAGE] * passages])
    start = time.process_time()
    state, first = generator.start(ctx, 4)
    prefill = time.process_time() - start
    tokens = torch.full((first.shape[0],), 220)  # (R,) a space, the same every step
    start = time.process_time()
    for _ in range(steps):
        generator.step(state, tokens)
    return prefill, time.process_time() - start


def run_phases(_: argparse.Namespace) -> None:
    from services.rag.loading import load_generator_for_inference

    weights = {
        "float32": load_generator_for_inference("default", "float32"),
        "int8": quantized(load_generator_for_inference("default", "float32")),
    }
    for generator in weights.values():
        phase_seconds(generator, 1)  # warm-up
    for _ in range(2):  # interleaved
        for name, generator in weights.items():
            (p1, s4), (p5, s20) = phase_seconds(generator, 1), phase_seconds(generator, 5)
            print(json.dumps({"weights": name, "prefill_1": p1, "steps_4_rows": s4, "prefill_5": p5,
                              "steps_20_rows": s20, "load1": os.getloadavg()[0]}))  # fmt: skip


def run_answers(args: argparse.Namespace) -> None:
    from cluster.passages import load_corpus
    from services.rag.local import LocalConfig, LocalRag
    from services.rag.model import generate_answers
    from training.data import load_qa

    cfg = LocalConfig(corpus=str(Path(args.data) / "corpus.jsonl"), precision="float32")
    local = LocalRag(load_corpus(cfg.corpus), cfg)
    generator = quantized(local.rag.generator) if args.weights == "int8" else local.rag.generator
    examples = load_qa(str(Path(args.data) / "validation.jsonl"))[: args.limit]
    out = Path(args.out)
    done = len(out.read_text().splitlines()) if out.exists() else 0
    with out.open("a") as sink:
        for i, example in enumerate(examples[done:], start=done):
            found = local.retrieve([example.input])
            wall, cpu = time.perf_counter(), time.process_time()
            prediction = generate_answers(
                generator, [example.input], found.titles, found.texts, found.doc_scores, cfg
            )[0]
            row = {"question": example.input, "answers": list(example.answers)}
            line = {"i": i, **row, "prediction": prediction, "wall_s": time.perf_counter() - wall,
                    "cpu_s": time.process_time() - cpu, "load1": os.getloadavg()[0]}  # fmt: skip
            sink.write(json.dumps(line) + "\n")
            sink.flush()


def run_compare(args: argparse.Namespace) -> None:
    from training.scoring import exact_match, f1_score
    from training.stats import compare, interval, paired_bootstrap

    first, second = ({r["i"]: r for r in map(json.loads, open(path))} for path in (args.first, args.second))
    common = sorted(set(first) & set(second))
    scores = {
        name: {
            "em": [exact_match(rows[i]["prediction"], rows[i]["answers"]) for i in common],
            "f1": [f1_score(rows[i]["prediction"], rows[i]["answers"]) for i in common],
            "cpu_s": [rows[i]["cpu_s"] for i in common],
        }
        for name, rows in (("first", first), ("second", second))
    }
    report: dict = {"files": [args.first, args.second], "questions": len(common)}
    for name, s in scores.items():
        median = float(np.median(s["cpu_s"]))
        report[name] = {"EM": interval(s["em"]), "F1": interval(s["f1"]), "cpu_s_median": median}
    report["em_first_minus_second"] = compare(scores["first"]["em"], scores["second"]["em"])
    report["f1_first_minus_second"] = paired_bootstrap(scores["first"]["f1"], scores["second"]["f1"])
    head = common[:100]
    report["identical_of_first_100"] = [
        sum(first[i]["prediction"] == second[i]["prediction"] for i in head),
        len(head),
    ]
    print(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True)
    commands.add_parser("phases").set_defaults(run=run_phases)
    answers = commands.add_parser("answers")
    answers.add_argument("--weights", choices=("float32", "int8"), required=True)
    answers.add_argument("--data", required=True, help="the experiment's data folder (--until data)")
    answers.add_argument("--out", required=True, help="JSONL of predictions (appended: resumes)")
    answers.add_argument("--limit", type=int, default=None, help="the first N validation questions")
    answers.set_defaults(run=run_answers)
    both = commands.add_parser("compare")
    both.add_argument("first")
    both.add_argument("second")
    both.set_defaults(run=run_compare)
    torch.set_num_threads(1)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
