"""Decoding without the least likely passages: same answers as the full decoding, proven or redone;
final prefixes while decoding."""

from __future__ import annotations

import pytest
import torch

from services.rag.config import DecodingConfig
from services.rag.decoding import final_prefix
from services.rag.generator import make_generator
from services.rag.marginal import doc_log_probs
from services.rag.model import complement, generate_answers, kept_passages, passages_of
from tests.services.rag.rag_fixtures import chat_tokenizer, tiny_bart, tiny_llama
from tests.services.rag.test_rag_generator import QUESTIONS, TEXTS, TITLES

PEAKED = torch.tensor([[40.0, 0.0, 1.0], [0.0, 0.5, 40.0]])  # (B, K) one passage holds ~all p(z|x)
SPREAD = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.0, 0.4]])
OPTIONS = {
    "sequence": {"mode": "sequence", "decoding": "fast", "num_beams": 3},
    "token": {"mode": "token", "num_beams": 1},
}


@pytest.fixture(scope="module", params=["causal", "seq2seq"])
def generator(request):
    tokenizer = chat_tokenizer()
    if request.param == "causal":
        return make_generator(tiny_llama(len(tokenizer), seed=3), tokenizer)
    return make_generator(tiny_bart(seed=3, vocab=len(tokenizer)), tokenizer)


def _decode(generator, scores, drop_mass, **options) -> tuple[list[str], list[int]]:
    """Answers and the passages per question of each prefill."""
    starts, start = [], generator.start
    generator.start = lambda ctx, copies: starts.append(ctx.n_docs) or start(ctx, copies)
    try:
        answers = generate_answers(
            generator,
            QUESTIONS,
            TITLES,
            TEXTS,
            scores,
            DecodingConfig(max_new_tokens=6, **options),
            drop_mass=drop_mass,
        )
    finally:
        del generator.start
    return answers, starts


def test_kept_passages_leave_out_the_least_likely_within_the_mass():
    scores = torch.tensor([[3.0, 0.0, 2.9], [0.0, 5.0, 0.1]])  # (B, K)
    probs = doc_log_probs(scores).exp()
    index, dropped = kept_passages(scores, drop_mass=0.1)
    assert index.tolist() == [[0, 2], [1, 2]]  # question 0 can drop only passage 1: K' = 2 for both
    assert dropped.tolist() == pytest.approx([probs[0, 1].item(), probs[1, 0].item()], rel=1e-5)
    assert complement(index, 3).tolist() == [[1], [0]]
    assert kept_passages(scores, drop_mass=0.0) is None
    assert kept_passages(torch.zeros(2, 3), drop_mass=0.1) is None  # uniform: nothing to drop
    ctx = make_generator(tiny_llama(len(chat_tokenizer())), chat_tokenizer()).contexts(
        QUESTIONS, TITLES, TEXTS
    )
    kept = passages_of(ctx, index)
    assert kept.n_docs == 2 and kept.input_ids.shape[0] == 4 and kept.attention_mask[:, 0].any()
    assert kept.input_ids[1, -5:].tolist() == ctx.input_ids[2, -5:].tolist()  # left-padded: ends align


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_dropping_a_negligible_passage_keeps_the_answer_and_decodes_fewer(generator, mode):
    exact, full = _decode(generator, PEAKED, 0.0, **OPTIONS[mode])
    fast, first = _decode(generator, PEAKED, 0.01, **OPTIONS[mode])
    assert full == [3] and first == [1]  # proven on the first decoding, with one passage each
    assert fast == exact


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_an_unproven_answer_is_decoded_again_with_every_passage(generator, mode):
    exact, _ = _decode(generator, SPREAD, 0.0, **OPTIONS[mode])
    again, starts = _decode(generator, SPREAD, 0.5, **OPTIONS[mode])
    # Tiny models lead by far less than the mass; RAG-Sequence decodes only the passages left out.
    assert starts == ([2, 1] if mode == "sequence" else [2, 3])
    assert again == exact


def test_beams_and_thorough_decoding_keep_every_passage(generator):
    for options in ({"mode": "token", "num_beams": 2}, {"mode": "sequence", "decoding": "thorough"}):
        _, starts = _decode(generator, PEAKED, 0.01, **options)
        assert starts == [3]


def test_final_prefix_is_what_every_hypothesis_shares():
    hyps = torch.tensor([[5, 6, 7, 1], [5, 6, 8, 1], [5, 6, 7, 2]])
    assert final_prefix(hyps).tolist() == [5, 6]
    assert final_prefix(hyps[:1]).tolist() == [5, 6, 7, 1]
    assert final_prefix(torch.tensor([[4, 6], [5, 6]])).tolist() == []


@pytest.mark.parametrize("beams", [1, 3])
def test_prefixes_grow_into_the_answer(generator, beams):
    """Every prefix reported is a prefix of the final tokens; greedy reports one more token a step."""
    prefixes: list[list[int]] = []
    options = DecodingConfig(mode="token", num_beams=beams, max_new_tokens=8)
    [answer] = generate_answers(
        generator,
        QUESTIONS[:1],
        TITLES[:1],
        TEXTS[:1],
        SPREAD[:1],
        options,
        drop_mass=0.0,
        on_prefix=lambda t: prefixes.append(t.tolist()),
    )
    assert prefixes
    for prefix, longer in zip(prefixes, prefixes[1:]):
        assert longer[: len(prefix)] == prefix
    for prefix in prefixes:
        assert answer.startswith(generator.decode(torch.tensor([prefix]))[0])
    if beams == 1:
        assert [len(p) for p in prefixes] == list(range(1, len(prefixes) + 1))
