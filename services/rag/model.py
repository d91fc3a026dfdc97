"""The user-facing RAG model: query encoder + generator, marginal NLL loss and decoding."""

from __future__ import annotations

import numpy as np
import torch

from cluster.encoders import TextEncoder
from services.rag.config import DecodingConfig, Mode
from services.rag.decoding import (
    BeamConfig,
    PrefixFn,
    Unproven,
    best_sequence,
    merge_beams,
    rag_sequence_generate,
    rag_token_generate,
    sequence_beams,
)
from services.rag.generator import Contexts, Generator
from services.rag.marginal import doc_log_probs, rag_sequence_nll, rag_token_nll
from services.rag.stopping import StopCheck, check_stop

DEFAULT_NORMALISED_SCALE = 20.0
# Passages whose p(z|x) adds up to at most this are left out of a first decoding, kept only when it
# proves they cannot change the answer (else the answer is decoded again with them).
DROP_MASS = 0.01


def default_doc_score_scale(query_encoder: TextEncoder) -> float:
    """20 for an L2-normalised encoder (cosine scores in [-1, 1]), 1 for a DPR-style one."""
    return DEFAULT_NORMALISED_SCALE if query_encoder.normalize else 1.0


def scaled_doc_scores(query_vectors: torch.Tensor, doc_vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · q(x)ᵀ d(z) for the K retrieved documents (B, K), differentiable in both inputs."""
    return scale * torch.einsum("bd,bkd->bk", query_vectors, doc_vectors)  # (B, K)


@torch.no_grad()
def generate_answers(
    generator: Generator,
    questions: list[str],
    titles: list[list[str]],
    texts: list[list[str]],
    doc_scores: np.ndarray | torch.Tensor,
    options: DecodingConfig,
    stop: StopCheck | None = None,
    on_prefix: PrefixFn | None = None,
    drop_mass: float = DROP_MASS,
) -> list[str]:
    """Answer each question from its K passages and their doc scores (B, K), decoded as `options` say
    (their n_docs aside: the passages given are decoded); one string each.

    `stop` is asked before the prefill and between decoding steps (GenerationStopped);
    `on_prefix` gets the first question's final tokens as they become final (RAG-Token).
    With `drop_mass` > 0, RAG-Sequence "fast" and greedy RAG-Token first decode without the
    least likely passages (p(z|x) summing to ≤ drop_mass) and keep that answer only when a bound
    proves the full decoding gives the same one (`services/rag/decoding.py: Unproven`); else
    RAG-Sequence decodes the passages left out and joins their beams, RAG-Token decodes again."""
    config = BeamConfig(num_beams=options.num_beams, max_new_tokens=options.max_new_tokens)
    ctx = generator.contexts(questions, titles, texts)
    scores = torch.as_tensor(doc_scores, dtype=torch.float32, device=ctx.input_ids.device)  # (B, K)
    check_stop(stop, "before the prefill")
    if options.mode == "token":
        kept = kept_passages(scores, drop_mass) if options.num_beams == 1 else None
        if kept is not None:
            index, dropped = kept
            try:
                sub = passages_of(ctx, index)
                return generator.decode(
                    rag_token_generate(
                        generator, sub, scores.gather(1, index), config, stop, on_prefix, dropped
                    )
                )
            except Unproven:
                pass
        return generator.decode(rag_token_generate(generator, ctx, scores, config, stop, on_prefix))  # (B, T)
    if options.decoding == "thorough":
        return generator.decode(rag_sequence_generate(generator, ctx, scores, config, True, stop))
    return generator.decode(_sequence_fast(generator, ctx, scores, config, drop_mass, stop))


def _sequence_fast(
    generator: Generator,
    ctx: Contexts,
    scores: torch.Tensor,
    config: BeamConfig,
    drop_mass: float,
    stop: StopCheck | None,
) -> torch.Tensor:
    """RAG-Sequence "fast" (B, T): first without the passages `kept_passages` leaves out, then,
    unless that answer is proven, with their beams decoded and joined to the others'."""
    kept = kept_passages(scores, drop_mass)
    if kept is None:
        return rag_sequence_generate(generator, ctx, scores, config, False, stop)
    index, dropped = kept
    _, beams = sequence_beams(generator, passages_of(ctx, index), config, stop)
    try:
        return best_sequence(generator, beams, scores.gather(1, index), config.num_beams, dropped=dropped)
    except Unproven:
        rest = complement(index, scores.shape[1])  # (B, K - K')
        _, more = sequence_beams(generator, passages_of(ctx, rest), config, stop)
        return best_sequence(generator, merge_beams(beams, more, index, rest), scores, config.num_beams)


def kept_passages(scores: torch.Tensor, drop_mass: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each question's K' most likely passages (B, K') in passage order, and the p(z|x) mass (B,)
    of the others; K' is the fewest that leave out ≤ drop_mass for every question. None when
    every passage is kept."""
    k = scores.shape[1]
    if drop_mass <= 0:
        return None
    probs = doc_log_probs(scores).exp()  # (B, K)
    ascending = probs.sort(dim=1).values.double().cumsum(1)  # (B, K)
    keep = k - int((ascending <= drop_mass).sum(1).min())
    if keep == k:
        return None
    index = probs.topk(keep, dim=1).indices.sort(dim=1).values  # (B, K')
    return index, (1 - probs.double().gather(1, index).sum(1)).clamp(min=0)


def complement(index: torch.Tensor, k: int) -> torch.Tensor:
    """The passages (B, K - K') not in index (B, K'), in passage order."""
    left = torch.ones((index.shape[0], k), dtype=torch.bool, device=index.device).scatter(1, index, False)
    return left.nonzero()[:, 1].view(index.shape[0], -1)


def passages_of(ctx: Contexts, index: torch.Tensor) -> Contexts:
    """The contexts of passages index (B, K') of each question, without all-padding columns."""
    b, k = ctx.batch_size, ctx.n_docs
    rows = (index + torch.arange(b, device=index.device)[:, None] * k).reshape(-1)  # (B*K',)
    mask = ctx.attention_mask[rows]  # (B*K', L)
    used = mask.any(0)  # (L,) the columns some row has a token in (padding is at one end)
    return Contexts(ctx.input_ids[rows][:, used], mask[:, used], index.shape[1])


class RagModel(torch.nn.Module):
    """RAG (Lewis et al. 2020) over a query encoder and a generator.

    doc_score_scale multiplies the inner product q(x)ᵀd(z) before the softmax over documents. For
    L2-normalised encoders (cosine scores in [-1, 1]) a scale of about 20 gives p(z|x) a useful
    spread; DPR-style unnormalised encoders want 1. `None` picks 20 when the encoder says it
    normalises (`encoder.normalize`) and 1 otherwise (`default_doc_score_scale`).
    """

    def __init__(
        self, query_encoder: TextEncoder, generator: Generator, doc_score_scale: float | None = None
    ) -> None:
        super().__init__()
        if doc_score_scale is None:
            doc_score_scale = default_doc_score_scale(query_encoder)
        if not doc_score_scale > 0:
            raise ValueError(f"doc_score_scale must be > 0, got {doc_score_scale}")
        self.query_encoder = query_encoder
        self.generator = generator
        self.doc_score_scale = float(doc_score_scale)

    def doc_scores(self, query_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        """scale · q(x)ᵀ d(z) for the K retrieved documents (B, K), differentiable in both inputs."""
        return scaled_doc_scores(query_vectors, doc_vectors, self.doc_score_scale)  # (B, K)

    def encode_queries(self, questions: list[str]) -> torch.Tensor:
        """q(x) with gradient (B, d)."""
        batch = self.query_encoder.tokenize(questions)
        device = next(self.query_encoder.parameters()).device
        return self.query_encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (B, d)

    def loss(
        self,
        questions: list[str],
        answers: list[str],
        titles: list[list[str]],
        texts: list[list[str]],
        doc_vectors: np.ndarray | torch.Tensor,
        mode: Mode = "sequence",
        *,
        epsilon: float = 0.0,
        exclude_bos_score: bool = False,
        doc_scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean negative marginal log-likelihood of the answers (scalar).

        `doc_scores` (B, K) fixes the logits of p(z|x) (BM25's, no gradient); by default they are
        scale · q(x)ᵀd(z), recomputed with gradient from the query encoder and `doc_vectors`."""
        if mode not in ("sequence", "token"):
            raise ValueError(f"mode must be 'sequence' or 'token', got {mode!r}")
        if doc_scores is None:
            query = self.encode_queries(questions)  # (B, d)
            docs = torch.as_tensor(doc_vectors, dtype=query.dtype, device=query.device)  # (B, K, d)
            scores = self.doc_scores(query, docs)  # (B, K)
        else:
            scores = torch.as_tensor(doc_scores, dtype=torch.float32, device=self.generator.device)  # (B, K)
        gen = self.generator
        ctx = gen.contexts(questions, titles, texts)
        target, mask = gen.answer_targets(answers)  # (B, T), (B, T)
        log_probs = gen.log_probs(ctx, target, mask)  # (B, K, T, V)
        nll_fn = rag_sequence_nll if mode == "sequence" else rag_token_nll
        nll = nll_fn(
            log_probs,
            scores.float(),
            target,
            pad_id=gen.pad_id,
            target_mask=mask,
            epsilon=epsilon,
            exclude_bos_score=exclude_bos_score,
            bos_id=gen.bos_id,
        )  # (B,)
        return nll.mean()

    def generate(
        self,
        questions: list[str],
        titles: list[list[str]],
        texts: list[list[str]],
        doc_scores: np.ndarray | torch.Tensor,
        options: DecodingConfig,
    ) -> list[str]:
        """Answer each question from its K passages; returns one string per question."""
        return generate_answers(self.generator, questions, titles, texts, doc_scores, options)
