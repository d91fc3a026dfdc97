"""RAG marginal likelihoods (Lewis et al. 2020, eqs. 1-2) as pure tensor math: no models, no Ray.

Conventions (the same as transformers' `RagSequenceForGeneration` / `RagTokenForGeneration`):
position t of the generator's log-probabilities scores target token t; positions where the
target mask is 0 (by default: where the target is `pad_id`) count for nothing. Label smoothing
mixes in the mean log-probability over the vocabulary with weight `epsilon`, and both functions
return the per-example loss (B,) so the caller chooses the reduction.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def doc_log_probs(doc_scores: torch.Tensor) -> torch.Tensor:
    """log p(z|x) over the K retrieved documents from their (unnormalised) scores."""
    return torch.log_softmax(doc_scores, dim=-1)  # (B, K)


def split_docs(x: torch.Tensor, n_docs: int | None) -> torch.Tensor:
    """View a (B*K, ...) tensor as (B, K, ...) when `n_docs` is given; otherwise return it as is."""
    if n_docs is None:
        return x
    if n_docs < 1 or x.shape[0] % n_docs:
        raise ValueError(f"leading size {x.shape[0]} is not a multiple of n_docs={n_docs}")
    return x.view(x.shape[0] // n_docs, n_docs, *x.shape[1:])


def target_mask_for(
    target: torch.Tensor,
    pad_id: int,
    target_mask: torch.Tensor | None,
    exclude_bos_score: bool = False,
    bos_id: int | None = None,
) -> torch.Tensor:
    """Which target positions are scored (B, T) float.

    `exclude_bos_score` drops position 0 of rows whose first target token is `bos_id`
    (transformers drops it only when every row of the batch starts with bos; the two agree
    whenever a generator forces bos, as BART does, or no row starts with it).
    """
    mask = (target != pad_id) if target_mask is None else target_mask.bool()  # (B, T)
    if exclude_bos_score and bos_id is not None:
        first = torch.zeros_like(mask)  # (B, T)
        first[:, 0] = target[:, 0] == bos_id
        mask = mask & ~first
    return mask.to(torch.float32)


def _gather(log_probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-doc log-probs of the targets and their sums over the vocabulary."""
    index = target[:, None, :, None].expand(-1, log_probs.shape[1], -1, 1)  # (B, K, T, 1)
    picked = log_probs.gather(-1, index).squeeze(-1)  # (B, K, T)
    return picked, log_probs.sum(-1)  # (B, K, T), (B, K, T)


def rag_sequence_nll(
    log_probs: torch.Tensor,
    doc_scores: torch.Tensor,
    target: torch.Tensor,
    *,
    pad_id: int,
    n_docs: int | None = None,
    target_mask: torch.Tensor | None = None,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
    bos_id: int | None = None,
    smooth: torch.Tensor | None = None,
    vocab_size: int | None = None,
    doc_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """-log Σ_z p(z|x) Π_t p(y_t|x,z,y_<t), per example (B,).

    log_probs: (B, K, T, V) normalised generator log-probs, or (B, K, T) already gathered at the
    targets (then label smoothing needs `smooth` (B, K, T) = Σ_v log p and `vocab_size`).
    With `n_docs`, `log_probs` may be (B*K, ...). `doc_mask` (B, K) bool sets p(y|x,z)=0 for
    masked documents (RAG-Sequence "fast" decoding). Smoothing follows transformers: the smooth
    objective is log Σ_z exp(Σ_t Σ_v log p + V log p(z|x)); transformers adds log p(z|x) at the
    second target position, so it loses it for one-token targets, where this always adds it.
    """
    log_probs = split_docs(log_probs, n_docs)
    if log_probs.dim() == 4:
        vocab_size = log_probs.shape[-1]
        log_probs, smooth = _gather(log_probs, target)  # (B, K, T), (B, K, T)
    if epsilon and (smooth is None or vocab_size is None):
        raise ValueError(f"label smoothing (epsilon={epsilon}) needs full (B, K, T, V) log-probs")
    doc_lp = doc_log_probs(doc_scores)  # (B, K)
    scored = target_mask_for(target, pad_id, target_mask, exclude_bos_score, bos_id)  # (B, T)
    seq_ll = (log_probs * scored[:, None, :]).sum(-1) + doc_lp  # (B, K)
    if doc_mask is not None:
        seq_ll = seq_ll.masked_fill(~doc_mask, NEG_INF)  # (B, K)
    nll = -seq_ll.logsumexp(-1)  # (B,)
    if not epsilon:
        return nll
    kept = target_mask_for(target, pad_id, target_mask)  # (B, T)
    smooth_ll = (smooth * kept[:, None, :]).sum(-1) + vocab_size * doc_lp  # (B, K)
    smooth_loss = -smooth_ll.logsumexp(-1)  # (B,)
    return (1.0 - epsilon) * nll + (epsilon / vocab_size) * smooth_loss


def marginalize_tokens(log_probs: torch.Tensor, doc_scores: torch.Tensor) -> torch.Tensor:
    """RAG-Token next-token distribution: log Σ_z p(z|x) p(y_t|x,z,y_<t) (B, K, ..., V) -> (B, ..., V)."""
    doc_lp = doc_log_probs(doc_scores)  # (B, K)
    doc_lp = doc_lp.view(*doc_lp.shape, *([1] * (log_probs.dim() - 2)))  # (B, K, 1.., 1)
    return (log_probs + doc_lp).logsumexp(1)  # (B, ..., V)


def rag_token_nll(
    log_probs: torch.Tensor,
    doc_scores: torch.Tensor,
    target: torch.Tensor,
    *,
    pad_id: int,
    n_docs: int | None = None,
    target_mask: torch.Tensor | None = None,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
    bos_id: int | None = None,
) -> torch.Tensor:
    """-Σ_t log Σ_z p(z|x) p(y_t|x,z,y_<t), per example (B,).

    log_probs: (B, K, T, V) normalised, or (B, K, T) gathered at the targets (no smoothing then).
    transformers' RAG-Token loss has no exclude-bos option; here it is offered for symmetry.
    """
    log_probs = split_docs(log_probs, n_docs)
    scored = target_mask_for(target, pad_id, target_mask, exclude_bos_score, bos_id)  # (B, T)
    if log_probs.dim() == 3:
        if epsilon:
            raise ValueError(f"label smoothing (epsilon={epsilon}) needs full (B, K, T, V) log-probs")
        token_ll = marginalize_tokens(log_probs, doc_scores)  # (B, T)
        return -(token_ll * scored).sum(-1)
    marginal = marginalize_tokens(log_probs, doc_scores)  # (B, T, V)
    token_ll = marginal.gather(-1, target[..., None]).squeeze(-1)  # (B, T)
    nll = -(token_ll * scored).sum(-1)  # (B,)
    if not epsilon:
        return nll
    kept = target_mask_for(target, pad_id, target_mask)  # (B, T)
    smooth_loss = -(marginal.sum(-1) * kept).sum(-1)  # (B,)
    vocab_size = marginal.shape[-1]
    return (1.0 - epsilon) * nll + (epsilon / vocab_size) * smooth_loss


def candidate_log_likelihoods(
    log_probs: torch.Tensor,
    doc_scores: torch.Tensor,
    candidates: torch.Tensor,
    candidate_mask: torch.Tensor,
    *,
    token: bool = False,
) -> torch.Tensor:
    """log p(y_c|x) of C fixed candidates for each example (B, C): the RAG-Sequence marginal
    log Σ_z p(z|x) Π_t p(y_t|x,z,y_<t), or with `token` the RAG-Token one Σ_t log Σ_z p(z|x) p(y_t|...).

    log_probs: (B, C, K, T) the generator's log-probs of candidate c's tokens under document k;
    candidates (C, T) their ids and candidate_mask (C, T) their real (non-pad) positions; doc_scores (B, K).
    """
    b, c, k, t = log_probs.shape
    nll_fn = rag_token_nll if token else rag_sequence_nll
    nll = nll_fn(
        log_probs.reshape(b * c, k, t),  # (B*C, K, T)
        doc_scores.repeat_interleave(c, dim=0),  # (B*C, K)
        candidates.repeat(b, 1),  # (B*C, T)
        pad_id=-1,  # unused: the mask marks the scored positions
        target_mask=candidate_mask.repeat(b, 1),  # (B*C, T)
    )  # (B*C,)
    return -nll.view(b, c)  # (B, C)
