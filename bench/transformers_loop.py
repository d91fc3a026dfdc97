"""The plain transformers reference for bench/serve.py: RAG-Sequence "fast" answers from one
`model.generate` per (question, passage), marginalised over the passages in a Python loop."""

from __future__ import annotations

import os
import time
from collections import defaultdict

import torch

from services.rag.generator import Generator, make_generator
from services.rag.loading import load_generator


def through_eos(tokens: list[int], eos_id: int) -> tuple[int, ...]:
    """Generated tokens up to and including the first eos (all of them when there is none)."""
    return tuple(tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens)


@torch.no_grad()
def loop_answer(
    generator: Generator, question: str, docs: list[dict], num_beams: int, max_new_tokens: int
) -> str:
    """RAG-Sequence "fast" answer over `docs` (dicts with title, text and score as the service
    returns them): beams per passage, then the distinct hypothesis of highest
    log p(y|x) = logsumexp_k [log p(z_k|x) + log p(y|x,z_k)] over the passages whose beams produced y."""
    model = generator.model
    doc_lp = torch.log_softmax(torch.tensor([d["score"] for d in docs], dtype=torch.float32), dim=0)  # (K,)
    joint: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
    for k, doc in enumerate(docs):
        prompt = generator.contexts([question], [[doc["title"]]], [[doc["text"]]]).input_ids  # (1, L)
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_beams,
            output_scores=True,
            return_dict_in_generate=True,
            do_sample=False,
            pad_token_id=generator.pad_id,
        )
        token_lp = model.compute_transition_scores(
            out.sequences, out.scores, getattr(out, "beam_indices", None), normalize_logits=True
        )  # (n, T)
        for tokens, lp in zip(out.sequences[:, prompt.shape[1] :].tolist(), token_lp, strict=True):
            hypothesis = through_eos(tokens, generator.eos_id)
            joint[hypothesis].append(doc_lp[k] + lp[: len(hypothesis)].sum())
    best = max(joint, key=lambda y: torch.logsumexp(torch.stack(joint[y]), dim=0).item())
    return generator.decode(torch.tensor([best]))[0]


def time_loop(
    generator_name: str, questions: list[str], docs: list[list[dict]], num_beams: int, max_new_tokens: int
) -> tuple[list[float], list[str]]:
    """Seconds and answer per question, one question at a time on all cores, with the float32
    generator `generator_name` (after one untimed warm-up answer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        generator = make_generator(*load_generator(generator_name))
        loop_answer(generator, questions[0], docs[0], num_beams, max_new_tokens)
        seconds, answers = [], []
        for question, question_docs in zip(questions, docs, strict=True):
            start = time.perf_counter()
            answers.append(loop_answer(generator, question, question_docs, num_beams, max_new_tokens))
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return seconds, answers
