"""Decoding benchmark: rayrag's RAG-Sequence thorough and RAG-Token decoding vs transformers' generate.

Both sides decode the same tiny seeded BART from the same context ids and document scores; we
report median times over several repeats and whether the token sequences are identical. The
default clock is this process's CPU time with one torch thread, which stays meaningful on a
shared machine; `--clock wall --threads 0` measures wall time with torch's default threads.
The last line printed is one JSON object.

    python bench/decoding.py --batch 8 --docs 5 --beams 4 --max-new-tokens 16 --context-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from services.rag.decoding import BeamConfig, rag_sequence_generate, rag_token_generate  # noqa: E402
from services.rag.generator import Contexts, Seq2SeqGenerator  # noqa: E402

PAD, EOS = 1, 2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="examples per call (B)")
    p.add_argument("--docs", type=int, default=5, help="documents per example (K)")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--context-len",
        type=int,
        default=128,
        help="tokens per (passage, question) input (a 100-word passage is ~130)",
    )
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall time")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build(args: argparse.Namespace) -> tuple[BartForConditionalGeneration, RagConfig]:
    """A seeded tiny BART (peaked weights, so beams differ across documents) and a RagConfig around it."""
    torch.manual_seed(args.seed)
    config = BartConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=4 * args.d_model,
        decoder_ffn_dim=4 * args.d_model,
        max_position_embeddings=max(128, args.context_len + args.max_new_tokens + 2),
        init_std=0.3,
        dropout=0.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=0,
        decoder_start_token_id=EOS,
        forced_eos_token_id=EOS,
    )
    q_config = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    rag_config = RagConfig.from_question_encoder_generator_configs(q_config, config, n_docs=args.docs)
    return BartForConditionalGeneration(config).eval(), rag_config


def timed(
    fn: Callable[[], torch.Tensor], repeats: int, clock: Callable[[], float]
) -> tuple[float, torch.Tensor]:
    """Median seconds over `repeats` calls (after one warm-up) and the last output."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = clock()
        out = fn()
        times.append(clock() - start)
    return statistics.median(times), out


def rows(tokens: torch.Tensor) -> list[list[int]]:
    """Token rows without trailing pads."""
    out = []
    for row in tokens.tolist():
        while row and row[-1] == PAD:
            row.pop()
        out.append(row)
    return out


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bart, rag_config = build(args)
    question_encoder = BertModel(rag_config.question_encoder)
    hf_seq = RagSequenceForGeneration(
        config=rag_config, question_encoder=question_encoder, generator=bart
    ).eval()
    hf_tok = RagTokenForGeneration(
        config=rag_config, question_encoder=question_encoder, generator=bart
    ).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    # Unpadded contexts: transformers' RAG-Sequence runs its per-document beams without a mask.
    ids = torch.randint(3, args.vocab, (args.batch * args.docs, args.context_len), generator=gen)
    mask = torch.ones_like(ids)
    doc_scores = 2 * torch.randn(args.batch, args.docs, generator=gen)
    hf_kwargs = dict(
        context_input_ids=ids,
        context_attention_mask=mask,
        doc_scores=doc_scores,
        n_docs=args.docs,
        num_beams=args.beams,
        max_length=args.max_new_tokens + 1,
    )
    ours = Seq2SeqGenerator(bart, tokenizer=None)
    ctx = Contexts(ids, mask, args.docs)
    config = BeamConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with torch.no_grad():
        t_hf_seq, ref_seq = timed(lambda: hf_seq.generate(**hf_kwargs), args.repeats, clock)
        t_seq, out_seq = timed(
            lambda: rag_sequence_generate(ours, ctx, doc_scores, config), args.repeats, clock
        )
        t_hf_tok, ref_tok = timed(lambda: hf_tok.generate(**hf_kwargs), args.repeats, clock)
        t_tok, out_tok = timed(lambda: rag_token_generate(ours, ctx, doc_scores, config), args.repeats, clock)
    seq_equal = rows(out_seq) == rows(ref_seq[:, 1:])
    tok_equal = rows(out_tok) == rows(ref_tok[:, 1:])
    print(
        f"RAG-Sequence thorough: transformers {t_hf_seq * 1e3:.1f} ms, rayrag {t_seq * 1e3:.1f} ms, "
        f"equal={seq_equal}"
    )
    print(
        f"RAG-Token beam search: transformers {t_hf_tok * 1e3:.1f} ms, rayrag {t_tok * 1e3:.1f} ms, "
        f"equal={tok_equal}"
    )
    result = {
        "seq_thorough_speedup": round(t_hf_seq / t_seq, 2),
        "token_speedup": round(t_hf_tok / t_tok, 2),
        "outputs_equal": seq_equal and tok_equal,
        "seq_outputs_equal": seq_equal,
        "token_outputs_equal": tok_equal,
        "hf_seq_ms": round(t_hf_seq * 1e3, 2),
        "ours_seq_ms": round(t_seq * 1e3, 2),
        "hf_token_ms": round(t_hf_tok * 1e3, 2),
        "ours_token_ms": round(t_tok * 1e3, 2),
        "torch_threads": torch.get_num_threads(),
        **{k: v for k, v in vars(args).items() if k != "threads"},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
