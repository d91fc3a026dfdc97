"""RAG-Sequence / RAG-Token losses against transformers' RagSequenceForGeneration / RagTokenForGeneration."""

from __future__ import annotations

import pytest
import torch

from services.rag.generator import Contexts, Seq2SeqGenerator
from services.rag.marginal import doc_log_probs, rag_sequence_nll, rag_token_nll
from tests.services.rag.rag_fixtures import (
    BART_BOS,
    BART_PAD,
    hf_rag,
    random_contexts,
    random_labels,
    tiny_bart,
)

B, K, VOCAB = 3, 4, 48


@pytest.fixture(scope="module")
def setup():
    bart = tiny_bart(vocab=VOCAB)
    ids, mask = random_contexts(B, K, VOCAB)
    labels = random_labels(B, VOCAB)
    doc_scores = torch.randn(B, K, generator=torch.Generator().manual_seed(3))
    gen = Seq2SeqGenerator(bart, tokenizer=None)
    target = labels[:, 1:]  # (B, T): what follows the decoder start token
    with torch.no_grad():
        log_probs = gen.log_probs(Contexts(ids, mask, K), target, target != BART_PAD)  # (B, K, T, V)
    return bart, ids, mask, labels, doc_scores, target, log_probs


def _reference(bart, mode, ids, mask, doc_scores, labels, epsilon, exclude_bos):
    seq, tok = hf_rag(bart, K, label_smoothing=epsilon)
    model = seq if mode == "sequence" else tok
    kwargs = {"exclude_bos_score": exclude_bos} if mode == "sequence" else {}
    with torch.no_grad():
        out = model(
            context_input_ids=ids,
            context_attention_mask=mask,
            doc_scores=doc_scores,
            labels=labels,
            n_docs=K,
            reduce_loss=False,
            **kwargs,
        )
    return out.loss  # (B,)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("exclude_bos", [False, True])
def test_sequence_loss_matches_transformers(setup, epsilon, exclude_bos):
    bart, ids, mask, labels, doc_scores, target, log_probs = setup
    ours = rag_sequence_nll(
        log_probs,
        doc_scores,
        target,
        pad_id=BART_PAD,
        epsilon=epsilon,
        exclude_bos_score=exclude_bos,
        bos_id=BART_BOS,
    )
    ref = _reference(bart, "sequence", ids, mask, doc_scores, labels, epsilon, exclude_bos)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_token_loss_matches_transformers(setup, epsilon):
    bart, ids, mask, labels, doc_scores, target, log_probs = setup
    ours = rag_token_nll(log_probs, doc_scores, target, pad_id=BART_PAD, epsilon=epsilon)
    ref = _reference(bart, "token", ids, mask, doc_scores, labels, epsilon, False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_gathered_and_flat_inputs_agree(setup):
    *_, doc_scores, target, log_probs = setup
    full_seq = rag_sequence_nll(log_probs, doc_scores, target, pad_id=BART_PAD)
    full_tok = rag_token_nll(log_probs, doc_scores, target, pad_id=BART_PAD)
    picked = log_probs.gather(-1, target[:, None, :, None].expand(-1, K, -1, 1)).squeeze(-1)  # (B, K, T)
    torch.testing.assert_close(rag_sequence_nll(picked, doc_scores, target, pad_id=BART_PAD), full_seq)
    torch.testing.assert_close(rag_token_nll(picked, doc_scores, target, pad_id=BART_PAD), full_tok)
    flat = log_probs.reshape(B * K, *log_probs.shape[2:])  # (B*K, T, V)
    torch.testing.assert_close(
        rag_sequence_nll(flat, doc_scores, target, pad_id=BART_PAD, n_docs=K), full_seq
    )
    with pytest.raises(ValueError, match="epsilon"):
        rag_token_nll(picked, doc_scores, target, pad_id=BART_PAD, epsilon=0.1)
    with pytest.raises(ValueError, match="leading size 12 is not a multiple of n_docs=5"):
        rag_sequence_nll(flat, doc_scores, target, pad_id=BART_PAD, n_docs=5)
    one_doc = log_probs[:, :1].reshape(B, *log_probs.shape[2:])  # (B*1, T, V): p(z|x) = 1
    one = rag_sequence_nll(one_doc, doc_scores[:, :1], target, pad_id=BART_PAD, n_docs=1)
    torch.testing.assert_close(one, -(picked[:, 0] * (target != BART_PAD)).sum(-1))


def test_marginals_by_hand_and_doc_mask(setup):
    *_, doc_scores, target, log_probs = setup
    picked = log_probs.gather(-1, target[:, None, :, None].expand(-1, K, -1, 1)).squeeze(-1)  # (B, K, T)
    scored = (target != BART_PAD).float()  # (B, T)
    per_doc = (picked * scored[:, None]).sum(-1)  # (B, K)
    probs = doc_log_probs(doc_scores).exp()  # (B, K)
    seq = -torch.log((probs * per_doc.exp()).sum(-1))  # (B,)
    tok = -(torch.log((probs[..., None] * picked.exp()).sum(1)) * scored).sum(-1)  # (B,)
    torch.testing.assert_close(rag_sequence_nll(picked, doc_scores, target, pad_id=BART_PAD), seq)
    torch.testing.assert_close(rag_token_nll(picked, doc_scores, target, pad_id=BART_PAD), tok)
    keep = torch.zeros(B, K, dtype=torch.bool)
    keep[:, 1] = True
    only_one = rag_sequence_nll(picked, doc_scores, target, pad_id=BART_PAD, doc_mask=keep)
    torch.testing.assert_close(only_one, -(torch.log(probs[:, 1]) + per_doc[:, 1]))


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_explicit_target_mask_matches_transformers(setup, mode, epsilon):
    # With a mask given, it alone says what is scored: pads replaced by a real token change nothing.
    bart, ids, mask, labels, doc_scores, target, log_probs = setup
    loss = rag_sequence_nll if mode == "sequence" else rag_token_nll
    ours = loss(
        log_probs,
        doc_scores,
        target.masked_fill(target == BART_PAD, 5),
        pad_id=BART_PAD,
        target_mask=target != BART_PAD,
        epsilon=epsilon,
    )
    ref = _reference(bart, mode, ids, mask, doc_scores, labels, epsilon, False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_bos_is_scored_unless_excluded(setup, mode):
    # Naming bos_id alone keeps transformers' default (exclude_bos_score=False); every target starts with bos.
    bart, ids, mask, labels, doc_scores, target, log_probs = setup
    loss = rag_sequence_nll if mode == "sequence" else rag_token_nll
    ours = loss(log_probs, doc_scores, target, pad_id=BART_PAD, bos_id=BART_BOS)
    ref = _reference(bart, mode, ids, mask, doc_scores, labels, 0.0, False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_token_loss_without_bos_by_loop_from_flat_input(setup):
    *_, doc_scores, target, log_probs = setup
    probs = torch.softmax(doc_scores, dim=-1)  # (B, K)
    expected = torch.zeros(B)
    for b in range(B):
        for t, token in enumerate(target[b].tolist()):
            if token == BART_PAD or (t == 0 and token == BART_BOS):
                continue
            expected[b] -= torch.log(sum(probs[b, z] * log_probs[b, z, t, token].exp() for z in range(K)))
    flat = log_probs.reshape(B * K, *log_probs.shape[2:])  # (B*K, T, V)
    ours = rag_token_nll(
        flat, doc_scores, target, pad_id=BART_PAD, n_docs=K, exclude_bos_score=True, bos_id=BART_BOS
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_gathered_input_with_smoothing_terms_matches_transformers(setup):
    bart, ids, mask, labels, doc_scores, target, log_probs = setup
    picked = log_probs.gather(-1, target[:, None, :, None].expand(-1, K, -1, 1)).squeeze(-1)  # (B, K, T)
    smooth = log_probs.sum(-1)  # (B, K, T)
    ours = rag_sequence_nll(
        picked, doc_scores, target, pad_id=BART_PAD, epsilon=0.1, smooth=smooth, vocab_size=VOCAB
    )
    ref = _reference(bart, "sequence", ids, mask, doc_scores, labels, 0.1, False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="epsilon=0.1"):
        rag_sequence_nll(picked, doc_scores, target, pad_id=BART_PAD, epsilon=0.1, smooth=smooth)


def test_gradient_reaches_doc_scores(setup):
    *_, doc_scores, target, log_probs = setup
    scores = doc_scores.clone().requires_grad_(True)
    (
        rag_sequence_nll(log_probs, scores, target, pad_id=BART_PAD).sum()
        + rag_token_nll(log_probs, scores, target, pad_id=BART_PAD).sum()
    ).backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
