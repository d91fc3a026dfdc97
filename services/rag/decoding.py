"""RAG decoding: RAG-Token beam search and RAG-Sequence thorough/fast, batched over examples × documents.

The beam search follows transformers' (v5) rules exactly — 2·beams candidates per step, length
penalty on finished hypotheses, its early-stop heuristic — so outputs can be compared token for
token with `RagTokenForGeneration.generate` and `RagSequenceForGeneration.generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.rag.generator import Contexts, DecodeState, Generator
from services.rag.marginal import doc_log_probs, rag_sequence_nll
from services.rag.stopping import StopCheck, check_stop

NEG = -1.0e9  # transformers' "impossible" score
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PrefixFn = Callable[[torch.Tensor], None]
"""Called after each step with the tokens (t,) of group 0 that no later step can change."""


class Unproven(Exception):
    """Decoding without the dropped passages could not prove that they leave the answer unchanged."""


@dataclass(frozen=True)
class BeamConfig:
    """Beam search settings; `max_new_tokens` counts generated tokens (eos included)."""

    num_beams: int
    max_new_tokens: int
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Beams:
    """Finished hypotheses per group, best first."""

    tokens: torch.Tensor  # (G, n, T) padded with pad_id
    scores: torch.Tensor  # (G, n) length-penalised log-probs
    token_log_probs: torch.Tensor  # (G, n, T) the model's log p(token_t | prefix), 0 at pads


def beam_search(
    first: torch.Tensor,
    step: StepFn,
    *,
    eos_id: int,
    pad_id: int,
    forced_eos_id: int | None,
    config: BeamConfig,
    stop: StopCheck | None = None,
    on_prefix: PrefixFn | None = None,
) -> Beams:
    """Beam search for G independent groups of n beams.

    first: log-probs (G, n, V) of the first token (rows of a group start identical).
    step(tokens (G, n), source (G, n)) -> log-probs (G, n, V): beam j now continues old beam
    source[g, j] of its group and appends tokens[g, j]. The token log-probs returned are the
    model's own, also where `forced_eos_id` overrides the choice at the last step. `stop` is
    asked before each model step; `on_prefix` gets group 0's final prefix after each step.
    """
    groups, n, vocab = first.shape
    t_max, device = config.max_new_tokens, first.device
    run_tokens = torch.full((groups, n, t_max), pad_id, dtype=torch.long, device=device)  # (G, n, T)
    run_scores = torch.full((groups, n), NEG, device=device)  # (G, n)
    run_scores[:, 0] = 0.0
    run_lp = torch.zeros((groups, n, t_max), device=device)  # (G, n, T)
    fin_tokens, fin_scores = run_tokens.clone(), torch.full((groups, n), NEG, device=device)
    fin_lp = run_lp.clone()
    fin_flag = torch.zeros((groups, n), dtype=torch.bool, device=device)  # (G, n)
    open_ = torch.ones((groups, 1), dtype=torch.bool, device=device)  # early-stop heuristic unsatisfied
    top_n = torch.arange(2 * n, device=device) < n  # (2n,)
    log_probs = first
    for t in range(t_max):
        model_lp = log_probs.reshape(groups, n * vocab)  # (G, n*V)
        if forced_eos_id is not None and t == t_max - 1:
            log_probs = torch.full_like(log_probs, float("-inf"))
            log_probs[..., forced_eos_id] = 0.0
        acc = (log_probs + run_scores[..., None]).view(groups, n * vocab)  # (G, n*V)
        cand_scores, cand_index = acc.topk(2 * n, dim=1)  # (G, 2n)
        source, token = cand_index // vocab, cand_index % vocab  # (G, 2n)
        cand_tokens = run_tokens.gather(1, source[..., None].expand(-1, -1, t_max))  # (G, 2n, T)
        cand_tokens[:, :, t] = token
        cand_lp = run_lp.gather(1, source[..., None].expand(-1, -1, t_max))  # (G, 2n, T)
        cand_lp[:, :, t] = model_lp.gather(1, cand_index)
        hits = (token == eos_id) | (t + 1 >= t_max)  # (G, 2n)
        keep_scores = cand_scores + hits.float() * NEG
        keep = keep_scores.topk(n, dim=1).indices  # (G, n)
        run_tokens = cand_tokens.gather(1, keep[..., None].expand(-1, -1, t_max))  # (G, n, T)
        run_lp = cand_lp.gather(1, keep[..., None].expand(-1, -1, t_max))  # (G, n, T)
        run_scores, run_source = keep_scores.gather(1, keep), source.gather(1, keep)  # (G, n)
        done_scores = cand_scores / ((t + 1) ** config.length_penalty)  # (G, 2n)
        done_scores = done_scores + (~open_).float() * NEG + (~(hits & top_n)).float() * NEG
        fin_scores, fin_flag, fin_tokens, fin_lp = _merge_finished(
            (fin_scores, fin_flag, fin_tokens, fin_lp), (done_scores, hits & top_n, cand_tokens, cand_lp), n
        )
        best_running = run_scores[:, :1] / ((t + 1) ** config.length_penalty)  # (G, 1)
        worst_done = torch.where(fin_flag, fin_scores.min(1, keepdim=True).values, NEG)  # (G, n)
        open_ = open_ & (best_running > worst_done).any(1, keepdim=True)
        if not open_.any() or hits.all():
            break
        if on_prefix is not None:
            live = torch.cat([run_tokens[0, run_scores[0] > NEG / 2], fin_tokens[0, fin_flag[0]]])  # (m, T)
            on_prefix(final_prefix(live[:, : t + 1]))
        check_stop(stop, f"after {t + 1} of {t_max} steps")
        log_probs = step(run_tokens[:, :, t], run_source)
    return Beams(fin_tokens, fin_scores, fin_lp)


def final_prefix(hyps: torch.Tensor) -> torch.Tensor:
    """The tokens (t,) every hypothesis (m, T) starts with: the best answer will start with them
    when `hyps` holds every live beam and every finished hypothesis."""
    agree = (hyps == hyps[:1]).all(0).long().cumprod(0)  # (T,)
    return hyps[0, : int(agree.sum())]


def _merge_finished(old: tuple, new: tuple, n: int) -> tuple:
    """Keep the best n (by the first tensor, the scores) of the finished hypotheses so far and this step's."""
    merged = [torch.cat([a, b], dim=1) for a, b in zip(old, new, strict=True)]  # each (G, 2n+n, ...)
    best = merged[0].topk(n, dim=1).indices  # (G, n)
    return tuple(
        x.gather(1, best.view(*best.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])) for x in merged
    )


def generated_mask(tokens: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Scored positions of generated sequences (N, T): up to the first eos, pads excluded."""
    after_eos = (tokens == eos_id).long().cumsum(1) - (tokens == eos_id).long()  # (N, T)
    return (after_eos == 0) & ((tokens != pad_id) | (tokens == eos_id))


def rag_token_generate(
    generator: Generator,
    ctx: Contexts,
    doc_scores: torch.Tensor,
    config: BeamConfig,
    stop: StopCheck | None = None,
    on_prefix: PrefixFn | None = None,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """RAG-Token beam search over the document-marginalised next-token distribution; (B, T) best.

    dropped (B,): the p(z|x) mass of passages left out of `ctx` (greedy only); each step then
    proves that they could not change its token, or raises Unproven.
    """
    b, k, n = ctx.batch_size, ctx.n_docs, config.num_beams
    if dropped is not None and n != 1:
        raise ValueError(f"passages can be dropped from RAG-Token greedy decoding only, not {n} beams")
    doc_lp = doc_log_probs(doc_scores.float())[:, :, None, None]  # (B, K, 1, 1)
    base = (torch.arange(b * k, device=doc_lp.device) * n).view(b, k, 1)  # (B, K, 1)

    def marginal(per_row: torch.Tensor) -> torch.Tensor:
        joint = per_row.view(b, k, n, -1) + doc_lp  # (B, K, n, V)
        mixture = joint.logsumexp(1)  # (B, n, V)
        if dropped is not None:
            _prove_greedy(mixture[:, 0], dropped)
        return torch.log_softmax(mixture, dim=-1)  # (B, n, V)

    state, first = generator.start(ctx, n)

    def step(tokens: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        generator.reorder(state, (base + source[:, None, :]).reshape(-1))  # rows (b, k, j)
        return marginal(generator.step(state, tokens[:, None, :].expand(b, k, n).reshape(-1)))

    beams = beam_search(
        marginal(first),
        step,
        eos_id=generator.eos_id,
        pad_id=generator.pad_id,
        forced_eos_id=generator.forced_eos_id,
        config=config,
        stop=stop,
        on_prefix=on_prefix,
    )
    return beams.tokens[:, 0]  # (B, T)


def _prove_greedy(mixture: torch.Tensor, dropped: torch.Tensor) -> None:
    """The dropped passages add at most `dropped` (B,) to any token's probability under the full
    mixture; the greedy token stands when its lead over the second exceeds that. mixture: (B, V)
    log Σ_z p(z|x) p(v|z) over the kept passages, p renormalised over them."""
    top = (mixture.topk(2, dim=-1).values.double().exp() * (1 - dropped[:, None])).cpu()  # (B, 2)
    if not bool((top[:, 0] - top[:, 1] > dropped.cpu()).all()):
        raise Unproven("a token's lead is within the dropped passages' mass")


def rag_sequence_generate(
    generator: Generator,
    ctx: Contexts,
    doc_scores: torch.Tensor,
    config: BeamConfig,
    thorough: bool = True,
    stop: StopCheck | None = None,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """RAG-Sequence: beams per document, then each distinct hypothesis scored by p(y|x); (B, T) best.

    thorough: p(y|x,z) is computed for every document; fast: taken as 0 for documents whose
    beam search did not produce y. A hypothesis's token log-probs under the document whose beams
    produced it come from the beam search itself; only the other documents are rescored.
    dropped (B,): the p(z|x) mass of passages left out of `ctx` ("fast" only); the best answer
    is then proven to be the same with them, or Unproven is raised.
    """
    if dropped is not None and thorough:
        raise ValueError("passages can be dropped from RAG-Sequence 'fast' decoding only")
    state, beams = sequence_beams(generator, ctx, config, stop)
    return best_sequence(generator, beams, doc_scores, config.num_beams, state if thorough else None, dropped)


def sequence_beams(
    generator: Generator, ctx: Contexts, config: BeamConfig, stop: StopCheck | None = None
) -> tuple[DecodeState, Beams]:
    """Beam search per context row: (B*K) groups of n beams, and the state that scores more."""
    b, k, n = ctx.batch_size, ctx.n_docs, config.num_beams
    state, first = generator.start(ctx, n)
    groups = torch.arange(b * k, device=first.device)[:, None] * n  # (B*K, 1)

    def step(tokens: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        generator.reorder(state, (groups + source).reshape(-1))
        return generator.step(state, tokens.reshape(-1)).view(b * k, n, -1)  # (B*K, n, V)

    beams = beam_search(
        first.view(b * k, n, -1),
        step,
        eos_id=generator.eos_id,
        pad_id=generator.pad_id,
        forced_eos_id=generator.forced_eos_id,
        config=config,
        stop=stop,
    )
    check_stop(stop, "before rescoring")
    return state, beams


def best_sequence(
    generator: Generator,
    beams: Beams,
    doc_scores: torch.Tensor,
    n: int,
    state: DecodeState | None = None,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """The best (B, T) of the (B*K) groups' beams by p(y|x): "thorough" with the `state` that
    rescores every hypothesis under every document, "fast" without (`dropped` as above)."""
    b, k = doc_scores.shape
    example, cands, inverse = _distinct_hypotheses(beams.tokens.view(b, k * n, -1))  # (N,), (N, T), (B*K*n,)
    row_doc = torch.arange(k, device=cands.device).repeat_interleave(n).repeat(b)  # (B*K*n,)
    produced = torch.zeros((cands.shape[0], k), dtype=torch.bool, device=cands.device)  # (N, K)
    produced[inverse, row_doc] = True
    token_ll = torch.zeros((cands.shape[0], k, cands.shape[1]), device=cands.device)  # (N, K, T)
    token_ll[inverse, row_doc] = beams.token_log_probs.view(b * k * n, -1)
    pairs = produced if state is None else torch.ones_like(produced)  # (N, K)
    cand_idx, doc_idx = (pairs & ~produced).nonzero(as_tuple=True)  # (P,), (P,)
    if cand_idx.numel():
        token_ll[cand_idx, doc_idx] = generator.score(state, example[cand_idx] * k + doc_idx, cands[cand_idx])
    mask = generated_mask(cands, generator.eos_id, generator.pad_id)  # (N, T)
    nll = rag_sequence_nll(
        token_ll,
        doc_scores.float()[example],
        cands,
        pad_id=generator.pad_id,
        target_mask=mask,
        exclude_bos_score=True,
        bos_id=generator.bos_id,
        doc_mask=pairs,
    )  # (N,)
    if dropped is not None:
        _prove_sequence(nll, example, dropped)
    return _best_per_example(nll, example, cands, b)


def merge_beams(first: Beams, second: Beams, first_docs: torch.Tensor, second_docs: torch.Tensor) -> Beams:
    """The beams of (B*K1) and (B*K2) groups decoded apart as the (B*K) groups of one decoding:
    first_docs (B, K1) and second_docs (B, K2) are each group's passage among the K."""
    b = first_docs.shape[0]
    order = torch.cat([first_docs, second_docs], dim=1).argsort(dim=1)  # (B, K) where each passage is

    def joined(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        both = torch.cat([x.view(b, -1, *x.shape[1:]), y.view(b, -1, *y.shape[1:])], dim=1)  # (B, K, ...)
        index = order.view(b, -1, *[1] * (both.dim() - 2)).expand_as(both)
        return both.gather(1, index).flatten(0, 1)  # (B*K, ...)

    return Beams(*(joined(x, y) for x, y in zip(vars(first).values(), vars(second).values(), strict=True)))


def _prove_sequence(nll: torch.Tensor, example: torch.Tensor, dropped: torch.Tensor) -> None:
    """With "fast" decoding the dropped passages add at most their mass m to p(y|x) of any answer,
    and answers only they produce score at most m: the best stands when it leads the second by
    more than m. nll (N,): -log p(y|x) with p(z|x) renormalised over the kept passages."""
    p = (-nll.double()).exp().cpu() * (1 - dropped.cpu()[example.cpu()])  # (N,)
    for b, mass in enumerate(dropped.cpu().tolist()):
        top = p[example.cpu() == b].topk(min(2, int((example == b).sum())), dim=0).values.tolist() + [0.0]
        if not top[0] - top[1] > mass:
            raise Unproven(f"example {b}: the best answer's lead is within the dropped mass {mass:.3g}")


def _distinct_hypotheses(hyps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct rows of hyps (B, M, T) per example: their example (N,), tokens (N, T) grouped by
    example, and the index (B*M,) of each input row among them."""
    b, m, _ = hyps.shape
    owner = torch.arange(b, device=hyps.device).repeat_interleave(m)  # (B*M,)
    keyed = torch.cat([owner[:, None], hyps.reshape(b * m, -1)], dim=1)  # (B*M, 1+T)
    unique, inverse = torch.unique(keyed, dim=0, return_inverse=True)  # (N, 1+T), (B*M,)
    return unique[:, 0], unique[:, 1:], inverse


def _best_per_example(nll: torch.Tensor, example: torch.Tensor, cands: torch.Tensor, b: int) -> torch.Tensor:
    """The lowest-loss candidate of each example (candidates are grouped by example)."""
    counts = torch.bincount(example, minlength=b).tolist()
    best = [
        part.argmin() + offset
        for part, offset in zip(
            nll.split(counts), torch.tensor([0, *counts[:-1]]).cumsum(0).tolist(), strict=True
        )
    ]
    return cands[torch.stack(best)]  # (B, T)
