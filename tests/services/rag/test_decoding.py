"""RAG-Token beam search and RAG-Sequence decoding against transformers' RAG `generate`."""
from __future__ import annotations

import pytest
import torch

from services.rag.decoding import (
    BeamConfig,
    generated_mask,
    rag_sequence_generate,
    rag_token_generate,
)
from services.rag.generator import Contexts, Seq2SeqGenerator
from services.rag.marginal import doc_log_probs
from tests.services.rag.rag_fixtures import (
    BART_EOS,
    BART_PAD,
    hf_rag,
    random_contexts,
    tiny_bart,
)

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
    ref = hf_tok.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores,
                          n_docs=k, num_beams=beams, max_length=max_new + 1)
    ours = rag_token_generate(Seq2SeqGenerator(bart, None), Contexts(ids, mask, k), doc_scores,
                              BeamConfig(num_beams=beams, max_new_tokens=max_new))
    assert _rows(ours) == _rows(ref[:, 1:])


def test_rag_sequence_thorough_matches_transformers(case):
    bart, _, _, doc_scores, k, beams, max_new = case
    # transformers runs the per-document beams without the context mask (it passes
    # attention_mask=None), so the reference is only exact on unpadded contexts.
    ids, mask = random_contexts(doc_scores.shape[0], k, VOCAB, seed=k, padded=False)
    hf_seq, _ = hf_rag(bart, k)
    ref = hf_seq.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores,
                          n_docs=k, num_beams=beams, max_length=max_new + 1)
    ours = rag_sequence_generate(Seq2SeqGenerator(bart, None), Contexts(ids, mask, k), doc_scores,
                                 BeamConfig(num_beams=beams, max_new_tokens=max_new), thorough=True)
    assert _rows(ours) == _rows(ref[:, 1:])


def _loop_fast(bart, ids, mask, doc_scores, k, beams, max_new) -> list[list[int]]:
    """RAG-Sequence fast decoding by loops: per example, per document beams, score only there."""
    best = []
    for b in range(doc_scores.shape[0]):
        lp_docs = doc_log_probs(doc_scores[b])  # (K,)
        totals: dict[tuple, torch.Tensor] = {}
        for z in range(k):
            row = slice(b * k + z, b * k + z + 1)
            hyps = bart.generate(ids[row], attention_mask=mask[row], num_beams=beams,
                                 num_return_sequences=beams, max_length=max_new + 1)
            for hyp in {tuple(h) for h in _rows(hyps)}:
                h = torch.tensor([hyp])
                logits = bart(input_ids=ids[row], attention_mask=mask[row], decoder_input_ids=h[:, :-1]).logits
                picked = torch.log_softmax(logits, -1).gather(-1, h[:, 1:, None]).squeeze(-1)  # (1, T)
                ll = (picked * generated_mask(h[:, 1:], BART_EOS, BART_PAD)).sum() + lp_docs[z]
                totals[hyp] = torch.logaddexp(totals[hyp], ll) if hyp in totals else ll
        best.append(list(max(totals, key=lambda h: totals[h].item()))[1:])
    return best


def test_rag_sequence_fast_matches_loop(case):
    bart, ids, mask, doc_scores, k, beams, max_new = case
    ours = rag_sequence_generate(Seq2SeqGenerator(bart, None), Contexts(ids, mask, k), doc_scores,
                                 BeamConfig(num_beams=beams, max_new_tokens=max_new), thorough=False)
    with torch.no_grad():
        assert _rows(ours) == _loop_fast(bart, ids, mask, doc_scores, k, beams, max_new)


def test_beam_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_beams"):
        BeamConfig(num_beams=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        BeamConfig(max_new_tokens=0)
