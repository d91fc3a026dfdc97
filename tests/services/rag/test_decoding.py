"""RAG-Token beam search and RAG-Sequence decoding against transformers' RAG `generate`."""

from __future__ import annotations

import pytest
import torch

from services.rag.decoding import (
    BeamConfig,
    Beams,
    beam_search,
    generated_mask,
    rag_sequence_generate,
    rag_token_generate,
)
from services.rag.generator import Contexts, Seq2SeqGenerator
from services.rag.marginal import doc_log_probs
from services.rag.stopping import GenerationStopped
from tests.services.rag.rag_fixtures import BART_EOS, BART_PAD, hf_rag, random_contexts, tiny_bart, tiny_llama

VOCAB = 48


def _rows(tokens: torch.Tensor) -> list[list[int]]:
    """Generated rows without trailing pads."""
    out = []
    for row in tokens.tolist():
        while row and row[-1] == BART_PAD:
            row.pop()
        out.append(row)
    return out


@pytest.fixture(scope="module", params=[(0, 3, 4, 3, 6), (1, 2, 5, 4, 9)], ids=["B3K4n3", "B2K5n4"])
def case(request):
    seed, b, k, beams, max_new = request.param
    bart = tiny_bart(seed=seed, vocab=VOCAB)
    ids, mask = random_contexts(b, k, VOCAB, seed=seed + 10)
    doc_scores = 2 * torch.randn(b, k, generator=torch.Generator().manual_seed(seed + 20))
    return bart, ids, mask, doc_scores, k, beams, max_new


def test_rag_token_matches_transformers(case):
    bart, ids, mask, doc_scores, k, beams, max_new = case
    _, hf_tok = hf_rag(bart, k)
    ref = hf_tok.generate(
        context_input_ids=ids,
        context_attention_mask=mask,
        doc_scores=doc_scores,
        n_docs=k,
        num_beams=beams,
        max_length=max_new + 1,
    )
    ours = rag_token_generate(
        Seq2SeqGenerator(bart, None),
        Contexts(ids, mask, k),
        doc_scores,
        BeamConfig(num_beams=beams, max_new_tokens=max_new),
    )
    assert _rows(ours) == _rows(ref[:, 1:])


def test_rag_sequence_thorough_matches_transformers(case):
    bart, _, _, doc_scores, k, beams, max_new = case
    # transformers runs the per-document beams without the context mask (it passes
    # attention_mask=None), so the reference is only exact on unpadded contexts.
    ids, mask = random_contexts(doc_scores.shape[0], k, VOCAB, seed=k, padded=False)
    hf_seq, _ = hf_rag(bart, k)
    ref = hf_seq.generate(
        context_input_ids=ids,
        context_attention_mask=mask,
        doc_scores=doc_scores,
        n_docs=k,
        num_beams=beams,
        max_length=max_new + 1,
    )
    ours = rag_sequence_generate(
        Seq2SeqGenerator(bart, None),
        Contexts(ids, mask, k),
        doc_scores,
        BeamConfig(num_beams=beams, max_new_tokens=max_new),
        thorough=True,
    )
    assert _rows(ours) == _rows(ref[:, 1:])


def _loop_fast(bart, ids, mask, doc_scores, k, beams, max_new) -> list[list[int]]:
    """RAG-Sequence fast decoding by loops: per example, per document beams, score only there."""
    best = []
    for b in range(doc_scores.shape[0]):
        lp_docs = doc_log_probs(doc_scores[b])  # (K,)
        totals: dict[tuple, torch.Tensor] = {}
        for z in range(k):
            row = slice(b * k + z, b * k + z + 1)
            hyps = bart.generate(
                ids[row],
                attention_mask=mask[row],
                num_beams=beams,
                num_return_sequences=beams,
                max_length=max_new + 1,
            )
            for hyp in {tuple(h) for h in _rows(hyps)}:
                h = torch.tensor([hyp])
                logits = bart(
                    input_ids=ids[row], attention_mask=mask[row], decoder_input_ids=h[:, :-1]
                ).logits
                picked = torch.log_softmax(logits, -1).gather(-1, h[:, 1:, None]).squeeze(-1)  # (1, T)
                ll = (picked * generated_mask(h[:, 1:], BART_EOS, BART_PAD)).sum() + lp_docs[z]
                totals[hyp] = torch.logaddexp(totals[hyp], ll) if hyp in totals else ll
        best.append(list(max(totals, key=lambda h: totals[h].item()))[1:])
    return best


def test_rag_sequence_fast_matches_loop(case):
    bart, ids, mask, doc_scores, k, beams, max_new = case
    ours = rag_sequence_generate(
        Seq2SeqGenerator(bart, None),
        Contexts(ids, mask, k),
        doc_scores,
        BeamConfig(num_beams=beams, max_new_tokens=max_new),
        thorough=False,
    )
    with torch.no_grad():
        assert _rows(ours) == _loop_fast(bart, ids, mask, doc_scores, k, beams, max_new)


def test_thorough_and_fast_differ_and_match_their_references():
    # A case where a hypothesis's score under documents that did not produce it decides the answer.
    bart, k, beams, max_new = tiny_bart(seed=11, vocab=VOCAB), 3, 2, 5
    ids, mask = random_contexts(2, k, VOCAB, seed=16, padded=False)
    doc_scores = 2 * torch.randn(2, k, generator=torch.Generator().manual_seed(31))
    hf_seq, _ = hf_rag(bart, k)
    gen, ctx = Seq2SeqGenerator(bart, None), Contexts(ids, mask, k)
    config = BeamConfig(num_beams=beams, max_new_tokens=max_new)
    with torch.no_grad():
        ref = hf_seq.generate(
            context_input_ids=ids,
            context_attention_mask=mask,
            doc_scores=doc_scores,
            n_docs=k,
            num_beams=beams,
            max_length=max_new + 1,
        )
        thorough = _rows(rag_sequence_generate(gen, ctx, doc_scores, config))  # thorough is the default
        fast = _rows(rag_sequence_generate(gen, ctx, doc_scores, config, thorough=False))
        assert thorough == _rows(ref[:, 1:])
        assert fast == _loop_fast(bart, ids, mask, doc_scores, k, beams, max_new)
    assert thorough != fast


def test_beam_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_beams"):
        BeamConfig(num_beams=0, max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        BeamConfig(num_beams=1, max_new_tokens=0)
    assert BeamConfig(num_beams=1, max_new_tokens=1).num_beams == 1  # the smallest valid settings


def _lm_beam_search(lm, prompts: torch.Tensor, config: BeamConfig, forced_eos_id: int | None) -> Beams:
    """beam_search with a causal LM as the step function, re-running it on the whole prefix each step."""
    groups, n, eos = prompts.shape[0], config.num_beams, lm.config.eos_token_id
    seqs = prompts.repeat_interleave(n, 0)  # (G*n, L)

    def next_log_probs(rows: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(lm(rows).logits[:, -1], -1).view(groups, n, -1)  # (G, n, V)

    def step(tokens: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        nonlocal seqs
        rows = (torch.arange(groups)[:, None] * n + source).reshape(-1)  # (G*n,)
        seqs = torch.cat([seqs[rows], tokens.reshape(-1, 1)], dim=1)
        return next_log_probs(seqs)

    return beam_search(
        next_log_probs(seqs), step, eos_id=eos, pad_id=eos, forced_eos_id=forced_eos_id, config=config
    )


def _until_eos(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    """Rows cut after their first eos."""
    return [row[: row.index(eos) + 1] if eos in row else row for row in tokens.tolist()]


# Chosen so that each case decides a rule: 2·beams candidates, length penalty on finished and
# running scores, the early-stop heuristic per group, forced eos, the max-length cut, greedy (1 beam).
@pytest.mark.parametrize(
    "seed,beams,length_penalty,forced_eos",
    [(3, 2, 2.0, False), (0, 1, 0.5, False), (0, 2, 0.5, True), (2, 2, 0.5, False)],
)
def test_beam_search_matches_transformers_generate(seed, beams, length_penalty, forced_eos):
    lm = tiny_llama(10, seed=seed)
    eos = lm.config.eos_token_id
    prompts = torch.randint(3, 10, (3, 4), generator=torch.Generator().manual_seed(seed))  # (G, L)
    config = BeamConfig(num_beams=beams, max_new_tokens=6, length_penalty=length_penalty)
    with torch.no_grad():
        ours = _lm_beam_search(lm, prompts, config, eos if forced_eos else None)
        ref = lm.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            num_beams=beams,
            max_new_tokens=6,
            length_penalty=length_penalty,
            eos_token_id=eos,
            pad_token_id=eos,
            forced_eos_token_id=eos if forced_eos else None,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert _until_eos(ours.tokens[:, 0], eos) == _until_eos(ref.sequences[:, prompts.shape[1] :], eos)
    if beams > 1:  # greedy search reports no sequence scores
        torch.testing.assert_close(ours.scores[:, 0], ref.sequences_scores)


@pytest.mark.parametrize("eos,pad", [(BART_EOS, BART_PAD), (2, 2)], ids=["seq2seq", "pad-is-eos"])
def test_generated_mask_by_loop(eos, pad):
    tokens = torch.randint(0, 4, (40, 6), generator=torch.Generator().manual_seed(0))  # (N, T)
    expected = []
    for row in tokens.tolist():
        keep, ended = [], False
        for tok in row:  # every token up to and including the first eos, except pads
            keep.append(not ended and (tok != pad or tok == eos))
            ended = ended or tok == eos
        expected.append(keep)
    assert generated_mask(tokens, eos, pad).tolist() == expected


@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("allowed_steps", [0, 3])
def test_decoding_stops_at_the_step_its_stop_check_says(mode, allowed_steps):
    """`stop` is asked before every model step: the decoding takes exactly the steps allowed."""
    bart, k = tiny_bart(seed=2, vocab=VOCAB), 3
    ids, mask = random_contexts(2, k, VOCAB, seed=5)
    generator, steps, checks = Seq2SeqGenerator(bart, None), [], []
    step = generator.step
    generator.step = lambda state, tokens: steps.append(1) or step(state, tokens)
    decode = rag_token_generate if mode == "token" else rag_sequence_generate
    with pytest.raises(GenerationStopped, match=f"after {allowed_steps + 1} of 40 steps"):
        decode(
            generator,
            Contexts(ids, mask, k),
            torch.zeros(2, k),
            BeamConfig(num_beams=2, max_new_tokens=40),
            stop=lambda: checks.append(1) or len(checks) > allowed_steps,
        )
    assert len(steps) == allowed_steps + 1  # the first step is part of the prefill (`start`)
