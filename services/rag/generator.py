"""Generator wrappers p(y|x,z): B×K inputs from (question, passage), target scoring, incremental decoding."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel, PreTrainedTokenizerBase

from services.rag.grouped_attention import grouped_attention
from services.rag.kv_cache import BeamLayer, rows_of

# Chosen on SmolLM2-135M-Instruct: with a "short phrase" instruction it often echoed the question.
SYSTEM_PROMPT = "You are a helpful assistant."
TITLE_SEP, DOC_SEP = " / ", " // "  # transformers' RagConfig defaults
SCORE_CHUNK = 1 << 24  # logits elements per forward when scoring many (context, target) pairs


@dataclass
class Contexts:
    """The B×K generator inputs: row b*K + k holds example b with its k-th document."""

    input_ids: torch.Tensor  # (B*K, L)
    attention_mask: torch.Tensor  # (B*K, L)
    n_docs: int

    def __post_init__(self) -> None:
        if self.n_docs < 1 or self.input_ids.shape[0] % self.n_docs:
            raise ValueError(
                f"{self.input_ids.shape[0]} context rows is not a multiple of n_docs={self.n_docs}"
            )

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0] // self.n_docs


@dataclass
class DecodeState:
    """Incremental decoding over R rows, each decoding one context row with a growing prefix."""

    cache: object
    attention_mask: torch.Tensor  # (R, L_ctx) encoder mask (seq2seq) or running mask (causal)
    encoder_hidden: torch.Tensor | None = None  # (R, L, d) seq2seq only
    prefix: dict = field(default_factory=dict)  # per-context tensors kept for rescoring


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into (N, L) ids and mask, on the left or the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (N, L)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (N, L)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def doc_count(titles: list[list[str]], texts: list[list[str]]) -> int:
    """K, the number of passages per question; every question must have the same K ≥ 1."""
    counts = {len(t) for t in titles} | {len(t) for t in texts}
    if len(counts) != 1 or 0 in counts or len(titles) != len(texts):
        raise ValueError(
            f"every question needs the same number (≥ 1) of titles and texts, got {sorted(counts)}"
        )
    return counts.pop()


def _first_id(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) else value


class Generator(torch.nn.Module, ABC):
    """p(y|x,z) over a loaded Hugging Face model; subclasses fix how (x, z) become model inputs."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        gen = model.generation_config
        self.eos_id: int = _first_id(
            gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        )
        pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
        self.pad_id: int = _first_id(pad) if pad is not None else self.eos_id
        self.forced_eos_id: int | None = _first_id(getattr(gen, "forced_eos_token_id", None))
        self.bos_id: int | None = None  # the first answer token, when answers start with one
        self.vocab_size: int = model.get_output_embeddings().weight.shape[0]
        self.max_positions: int = getattr(model.config, "max_position_embeddings", None) or 1 << 30

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def answer_targets(self, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target ids (B, T) padded with `pad_id` and their mask (B, T); too long → ValueError."""
        seqs = [self._answer_ids(a) for a in answers]
        longest = max(len(s) for s in seqs)
        if longest > self.max_positions:
            raise ValueError(
                f"answer of {longest} tokens is longer than the generator's context of {self.max_positions} "
                f"tokens: {answers[[len(s) for s in seqs].index(longest)]!r}"
            )
        ids, mask = pad_batch(seqs, self.pad_id, left=False)
        return ids.to(self.device), mask.to(self.device)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Generated ids (B, T) → answers, cut at the first eos."""
        texts = []
        for row in tokens.tolist():
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    @torch.no_grad()
    def score(self, state: DecodeState, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target_t | context row, target_<t) for each (row, target) pair (P, T), teacher-forced.

        Reuses the context work of `start` (encoder states / prompt keys), so only the targets run.
        """
        per_chunk = max(1, SCORE_CHUNK // max(1, target.shape[1] * self.vocab_size))
        parts = [
            self._score_chunk(state, rows[i : i + per_chunk], target[i : i + per_chunk])
            for i in range(0, rows.shape[0], per_chunk)
        ]
        return torch.cat(parts)  # (P, T)

    def _check_context(self, ids: list[int], text: str) -> None:
        if len(ids) > self.max_positions:
            raise ValueError(
                f"generator input of {len(ids)} tokens exceeds the model's context of "
                f"{self.max_positions} tokens: {text[:80]!r}..."
            )

    @abstractmethod
    def _answer_ids(self, answer: str) -> list[int]: ...

    @abstractmethod
    def contexts(self, questions: list[str], titles: list[list[str]], texts: list[list[str]]) -> Contexts:
        """Tokenise the B×K (question, passage) pairs into model inputs."""

    @abstractmethod
    def log_probs(self, ctx: Contexts, target: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Per-document log p(y_t|x,z,y_<t) over the vocabulary (B, K, T, V), differentiable, one forward."""

    @abstractmethod
    def start(self, ctx: Contexts, copies: int) -> tuple[DecodeState, torch.Tensor]:
        """Begin decoding `copies` rows per context (row (b*K+k)*copies + j); first log-probs (R, V)."""

    @abstractmethod
    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (R,), return next-token log-probs (R, V) in float32."""

    @abstractmethod
    def reorder(self, state: DecodeState, index: torch.Tensor) -> None:
        """Row r continues row index[r]; both must decode the same context (a beam reorder)."""

    @abstractmethod
    def _score_chunk(self, state: DecodeState, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


def _gather_log_probs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (P, T, V)
    return log_probs.gather(-1, target[..., None]).squeeze(-1)  # (P, T)


class Seq2SeqGenerator(Generator):
    """Encoder-decoder (BART, T5): "title / text // question" in the encoder, the answer in the decoder."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(model, tokenizer)
        self.start_id: int = model.config.decoder_start_token_id
        self.bos_id = model.config.bos_token_id

    def _answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer)["input_ids"]

    def contexts(self, questions: list[str], titles: list[list[str]], texts: list[list[str]]) -> Contexts:
        n_docs = doc_count(titles, texts)
        seqs = []
        for question, doc_titles, doc_texts in zip(questions, titles, texts, strict=True):
            for title, text in zip(doc_titles, doc_texts, strict=True):
                line = f"{title}{TITLE_SEP}{text}{DOC_SEP}{question}"
                seqs.append(self.tokenizer(line)["input_ids"])
                self._check_context(seqs[-1], line)
        ids, mask = pad_batch(seqs, self.pad_id, left=False)
        return Contexts(ids.to(self.device), mask.to(self.device), n_docs)

    def _decoder_inputs(self, target: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(target[:, :1], self.start_id)  # (N, 1)
        return torch.cat([start, target[:, :-1]], dim=1)  # (N, T)

    def log_probs(self, ctx: Contexts, target: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        decoder_ids = self._decoder_inputs(target).repeat_interleave(ctx.n_docs, dim=0)  # (B*K, T)
        out = self.model(
            input_ids=ctx.input_ids,
            attention_mask=ctx.attention_mask,
            decoder_input_ids=decoder_ids,
            use_cache=False,
        )
        log_probs = torch.log_softmax(out.logits.float(), dim=-1)  # (B*K, T, V)
        return log_probs.view(ctx.batch_size, ctx.n_docs, *log_probs.shape[1:])  # (B, K, T, V)

    @torch.no_grad()
    def start(self, ctx: Contexts, copies: int) -> tuple[DecodeState, torch.Tensor]:
        hidden = self.model.get_encoder()(
            input_ids=ctx.input_ids, attention_mask=ctx.attention_mask
        ).last_hidden_state
        state = DecodeState(
            EncoderDecoderCache(DynamicCache(), DynamicCache()),
            ctx.attention_mask,
            hidden,
            prefix={"hidden": hidden, "mask": ctx.attention_mask},
        )
        start = torch.full(
            (hidden.shape[0],), self.start_id, dtype=torch.long, device=hidden.device
        )  # (B*K,)
        first = self.step(state, start)  # (B*K, V): the first step is the same for every copy of a context
        cross = state.cache.cross_attention_cache.layers
        state.prefix["cross"] = [(layer.keys, layer.values) for layer in cross]
        rows = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(copies)  # (R,)
        # Cross-attention keys stay one row per context: `grouped_sdpa` shares them among its copies.
        state.cache.self_attention_cache.reorder_cache(rows)
        # Once the cross-attention keys are cached, the decoder reads only the encoder states' shape.
        state.attention_mask, state.encoder_hidden = (
            ctx.attention_mask[rows],
            hidden[:1].expand(rows.shape[0], -1, -1),
        )
        return state, first[rows]

    @torch.no_grad()
    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        with grouped_attention(self.model):
            out = self.model(
                decoder_input_ids=tokens[:, None],
                encoder_outputs=(state.encoder_hidden,),
                attention_mask=state.attention_mask,
                cache=state.cache,
                use_cache=True,
            )
        state.cache = out.cache
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (R, V)

    def reorder(self, state: DecodeState, index: torch.Tensor) -> None:
        # Cross-attention keys depend only on the context, which a beam reorder keeps.
        state.cache.self_attention_cache.reorder_cache(index)

    @torch.no_grad()
    def _score_chunk(self, state: DecodeState, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        contexts, width, slot = _context_blocks(rows)
        padded = target.new_full((len(contexts) * width, target.shape[1]), self.pad_id)  # (C*W, T)
        padded[slot] = target
        cross = rows_of(state.prefix["cross"], contexts)  # (C, h, L, d) per layer, shared by each block
        # The cross-attention keys come from the cache; the decoder reads only the encoder
        # states' shape then, so a broadcast view stands in for them.
        hidden = state.prefix["hidden"][:1].expand(padded.shape[0], -1, -1)  # (C*W, L, d)
        mask = state.prefix["mask"][contexts].repeat_interleave(width, dim=0)  # (C*W, L)
        with grouped_attention(self.model):
            out = self.model(
                encoder_outputs=(hidden,),
                attention_mask=mask,
                decoder_input_ids=self._decoder_inputs(padded),
                cache=EncoderDecoderCache(DynamicCache(), cross),
                use_cache=True,
            )
        return _gather_log_probs(out.logits, padded)[slot]  # (P, T)


def _context_blocks(rows: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Lay pairs out as one block of W rows per distinct context: the contexts (C,), W, and each
    pair's row (P,) in that (C*W) batch."""
    order = rows.argsort(stable=True)  # (P,)
    contexts, counts = rows[order].unique_consecutive(return_counts=True)  # (C,), (C,)
    width = int(counts.max())
    block = torch.arange(len(contexts), device=rows.device).repeat_interleave(counts)  # (P,) in sorted order
    first = (counts.cumsum(0) - counts).repeat_interleave(counts)  # (P,) sorted index where its block starts
    sorted_slot = block * width + torch.arange(rows.shape[0], device=rows.device) - first  # (P,)
    return contexts, width, torch.empty_like(sorted_slot).index_copy_(0, order, sorted_slot)


class CausalGenerator(Generator):
    """Decoder-only: the prompt holds the passage and the question (chat template when there is one)."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, system_prompt: str = SYSTEM_PROMPT
    ) -> None:
        super().__init__(model, tokenizer)
        self.system_prompt = system_prompt
        self.chat = getattr(tokenizer, "chat_template", None) is not None

    def _prompt_ids(self, question: str, title: str, text: str) -> list[int]:
        if not self.chat:
            return self.tokenizer(f"{title}. {text}\nQuestion: {question}\nAnswer:")["input_ids"]
        messages = [
            {"role": "system", "content": self.system_prompt},
            {
                "role": "user",
                "content": f"Context: {title}. {text}\n\nUsing the context, answer briefly: {question}",
            },
        ]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding or a list

    def _answer_ids(self, answer: str) -> list[int]:
        text = answer if self.chat else f" {answer}"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def contexts(self, questions: list[str], titles: list[list[str]], texts: list[list[str]]) -> Contexts:
        n_docs = doc_count(titles, texts)
        seqs = [
            self._prompt_ids(q, title, text)
            for q, doc_titles, doc_texts in zip(questions, titles, texts, strict=True)
            for title, text in zip(doc_titles, doc_texts, strict=True)
        ]
        for s in seqs:
            self._check_context(s, self.tokenizer.decode(s))
        ids, mask = pad_batch(seqs, self.pad_id, left=True)
        return Contexts(ids.to(self.device), mask.to(self.device), n_docs)

    def log_probs(self, ctx: Contexts, target: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        if ctx.input_ids.shape[1] + target.shape[1] > self.max_positions:
            raise ValueError(
                f"prompt of {ctx.input_ids.shape[1]} tokens + answer of {target.shape[1]} tokens "
                f"exceeds the model's context of {self.max_positions} tokens"
            )
        k = ctx.n_docs
        ids = torch.cat([ctx.input_ids, target.repeat_interleave(k, dim=0)[:, :-1]], dim=1)  # (B*K, L+T-1)
        mask = torch.cat([ctx.attention_mask, target_mask.repeat_interleave(k, dim=0)[:, :-1]], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B*K, L+T-1)
        out = self.model(  # logits only at the T answer positions (the last T of L+T-1)
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=target.shape[1],
        )
        log_probs = torch.log_softmax(out.logits.float(), dim=-1)  # (B*K, T, V)
        return log_probs.view(ctx.batch_size, k, *log_probs.shape[1:])  # (B, K, T, V)

    @torch.no_grad()
    def start(self, ctx: Contexts, copies: int) -> tuple[DecodeState, torch.Tensor]:
        mask = ctx.attention_mask
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B*K, L)
        out = self.model(
            input_ids=ctx.input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B*K, V)
        kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        rows = torch.arange(mask.shape[0], device=mask.device).repeat_interleave(copies)  # (R,)
        cache = DynamicCache()
        cache.layers = [
            BeamLayer(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in kv
        ]
        prefix = {"kv": kv, "mask": mask, "first": first}
        return DecodeState(cache, mask[rows], prefix=prefix), first[rows]

    @torch.no_grad()
    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        state.attention_mask = torch.cat([state.attention_mask, torch.ones_like(tokens)[:, None]], dim=1)
        positions = state.attention_mask.sum(1, keepdim=True) - 1  # (R, 1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=state.attention_mask,
            position_ids=positions,
            cache=state.cache,
            use_cache=True,
        )
        state.cache = out.cache
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (R, V)

    def reorder(self, state: DecodeState, index: torch.Tensor) -> None:
        state.cache.reorder_cache(index)  # rows of one context share their prompt mask

    @torch.no_grad()
    def _score_chunk(self, state: DecodeState, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        first = state.prefix["first"][rows].gather(1, target[:, :1])  # (P, 1)
        if target.shape[1] == 1:
            return first
        cache = rows_of(state.prefix["kv"], rows)
        follow = target[:, :-1]  # (P, T-1)
        mask = torch.cat([state.prefix["mask"][rows], torch.ones_like(follow)], dim=1)  # (P, L+T-1)
        positions = state.prefix["mask"][rows].sum(1, keepdim=True) + torch.arange(
            follow.shape[1], device=follow.device
        )
        out = self.model(
            input_ids=follow, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )
        return torch.cat([first, _gather_log_probs(out.logits, target[:, 1:])], dim=1)  # (P, T)


def make_generator(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Generator:
    """The wrapper that fits the model: seq2seq for encoder-decoders, causal otherwise."""
    if getattr(model.config, "is_encoder_decoder", False):
        return Seq2SeqGenerator(model, tokenizer)
    return CausalGenerator(model, tokenizer)
