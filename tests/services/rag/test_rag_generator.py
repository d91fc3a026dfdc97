"""Decoder-only RAG against brute-force loops over documents (tiny Llama + a chat tokenizer), and RagModel."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from cluster.encoders import TextEncoder
from services.rag.config import DecodingConfig
from services.rag.decoding import BeamConfig, generated_mask, rag_sequence_generate, rag_token_generate
from services.rag.generator import CausalGenerator, make_generator
from services.rag.marginal import doc_log_probs, rag_sequence_nll, rag_token_nll
from services.rag.model import RagModel
from tests.services.rag.rag_fixtures import chat_tokenizer, tiny_llama

QUESTIONS = ["who directed the film ?", "what is the capital of france ?"]
TITLES = [["space odyssey", "stanley kubrick", "paris"], ["paris", "france", "river seine"]]
TEXTS = [
    ["the film was directed by stanley kubrick in 1968 .", "kubrick directed the film", "a city"],
    ["paris is the capital city of france .", "france is a . , country", "the river in paris"],
]
ANSWERS = ["stanley kubrick", "paris"]


@pytest.fixture(scope="module")
def causal():
    tokenizer = chat_tokenizer()
    gen = make_generator(tiny_llama(len(tokenizer)), tokenizer)
    assert isinstance(gen, CausalGenerator)
    return gen


def _prompt(gen: CausalGenerator, b: int, k: int) -> list[int]:
    return gen._prompt_ids(QUESTIONS[b], TITLES[b][k], TEXTS[b][k])


def _brute_token_log_probs(gen: CausalGenerator, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log p(answer_t | prompt, answer_<t) with the plain model on one unpadded sequence (T,)."""
    ids = torch.tensor([prompt + answer])
    logits = gen.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (T, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)


def test_prompt_uses_chat_template_and_scores_only_the_answer(causal):
    text = causal.tokenizer.decode(_prompt(causal, 0, 0))
    assert text.startswith("<|im_start|> system ") and "<|im_start|> user " in text
    assert "space" in text and "the film was directed by stanley kubrick in 1968" in text
    assert text.endswith("<|im_end|> <|im_start|> assistant")  # the generation prompt, no answer
    target, mask = causal.answer_targets(ANSWERS)
    assert target[1, mask[1].sum() - 1] == causal.eos_id  # answers end with eos
    assert mask.sum(1).tolist() == [3, 2]


def test_marginals_equal_brute_force_loop(causal):
    doc_scores = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.9, -1.0]])
    ctx = causal.contexts(QUESTIONS, TITLES, TEXTS)
    target, mask = causal.answer_targets(ANSWERS)
    with torch.no_grad():
        log_probs = causal.log_probs(ctx, target, mask)  # (B, K, T, V)
        seq = rag_sequence_nll(log_probs, doc_scores, target, pad_id=causal.pad_id, target_mask=mask)
        tok = rag_token_nll(log_probs, doc_scores, target, pad_id=causal.pad_id, target_mask=mask)
        for b in range(len(ANSWERS)):
            answer_ids = target[b, : int(mask[b].sum())].tolist()
            per_doc = torch.stack(
                [_brute_token_log_probs(causal, _prompt(causal, b, k), answer_ids) for k in range(3)]
            )  # (K, T)
            doc_lp = doc_log_probs(doc_scores[b])  # (K,)
            torch.testing.assert_close(
                seq[b], -torch.logsumexp(per_doc.sum(1) + doc_lp, 0), atol=1e-5, rtol=0
            )
            brute_tok = -torch.logsumexp(per_doc + doc_lp[:, None], 0).sum()
            torch.testing.assert_close(tok[b], brute_tok, atol=1e-5, rtol=0)


def test_sequence_thorough_equals_loop_over_documents(causal):
    doc_scores = torch.tensor([[0.5, -0.5, 0.0], [1.0, 0.0, -2.0]])
    config = BeamConfig(num_beams=3, max_new_tokens=5)
    ours = rag_sequence_generate(causal, causal.contexts(QUESTIONS, TITLES, TEXTS), doc_scores, config)
    with torch.no_grad():
        for b in range(2):
            prompts = [_prompt(causal, b, k) for k in range(3)]
            hyps = set()
            for prompt in prompts:  # per-document beams, one unpadded prompt at a time
                out = causal.model.generate(
                    torch.tensor([prompt]),
                    num_beams=3,
                    num_return_sequences=3,
                    max_new_tokens=5,
                    do_sample=False,
                )
                hyps |= {tuple(row[len(prompt) :]) for row in out.tolist()}
            doc_lp = doc_log_probs(doc_scores[b])  # (K,)

            def total(h: tuple[int, ...], prompts=prompts, doc_lp=doc_lp) -> float:
                keep = int(generated_mask(torch.tensor([h]), causal.eos_id, causal.pad_id).sum())
                per_doc = torch.stack(
                    [_brute_token_log_probs(causal, p, list(h[:keep])).sum() for p in prompts]
                )  # (K,)
                return torch.logsumexp(per_doc + doc_lp, 0).item()

            best = max(hyps, key=total)
            keep = int(generated_mask(torch.tensor([best]), causal.eos_id, causal.pad_id).sum())
            got = ours[b].tolist()
            assert got[:keep] == list(best[:keep])


def test_too_long_inputs_raise(causal):
    with pytest.raises(ValueError, match="longer than the generator's context of 256"):
        causal.answer_targets(["the " * 300])
    ctx = causal.contexts(QUESTIONS, TITLES, TEXTS)
    target, mask = causal.answer_targets(["the " * 250, "paris"])
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens \+ answer of 251 tokens"):
        causal.log_probs(ctx, target, mask)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        causal.contexts(["the " * 300], [["paris"]], [["a city"]])
    with pytest.raises(ValueError, match=r"same number .* got \[1, 2\]"):
        causal.contexts(QUESTIONS, [["paris"], ["a", "b"]], [["x"], ["y", "z"]])


def _rag_model(causal: CausalGenerator) -> RagModel:
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(causal.tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).eval()
    encoder = TextEncoder("tiny", bert, causal.tokenizer, pooling="mean", normalize=True)
    return RagModel(encoder, causal)


def _text(gen: CausalGenerator, row: list[int]) -> str:
    """Generated ids → the answer: up to the first eos, special tokens dropped."""
    row = row[: row.index(gen.eos_id)] if gen.eos_id in row else row
    return gen.tokenizer.decode(row, skip_special_tokens=True).strip()


def test_rag_model_loss_and_generate(causal):
    model = _rag_model(causal)
    assert model.doc_score_scale == 20.0
    doc_vectors = torch.nn.functional.normalize(torch.randn(2, 3, 16), dim=-1)  # (B, K, d)
    loss = model.loss(QUESTIONS, ANSWERS, TITLES, TEXTS, doc_vectors.numpy(), mode="token")
    loss.backward()
    grads = [p.grad for p in model.query_encoder.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0  # p(z|x) carries gradient to q(x)
    with torch.no_grad():
        scores = model.doc_scores(model.encode_queries(QUESTIONS), doc_vectors)  # (B, K)
        ctx = causal.contexts(QUESTIONS, TITLES, TEXTS)
        target, mask = causal.answer_targets(ANSWERS)
        expected = rag_token_nll(
            causal.log_probs(ctx, target, mask), scores, target, pad_id=causal.pad_id, target_mask=mask
        ).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=0)
    doc_scores = torch.tensor([[1.0, 1.0, -1.0], [0.3, 0.2, 0.1]])  # (B, K) the three decodings disagree here
    config = BeamConfig(num_beams=3, max_new_tokens=5)
    with torch.no_grad():
        expected_tokens = {  # (B, T) each, from the decoders themselves
            ("sequence", "thorough"): rag_sequence_generate(causal, ctx, doc_scores, config, thorough=True),
            ("sequence", "fast"): rag_sequence_generate(causal, ctx, doc_scores, config, thorough=False),
            ("token", "thorough"): rag_token_generate(causal, ctx, doc_scores, config),
        }
    expected = {key: [_text(causal, row) for row in rows.tolist()] for key, rows in expected_tokens.items()}
    assert len({tuple(texts) for texts in expected.values()}) == 3  # so a mix-up of modes shows
    for (mode, decoding), texts in expected.items():
        answers = model.generate(
            QUESTIONS,
            TITLES,
            TEXTS,
            doc_scores,
            DecodingConfig.parse(
                {"mode": mode, "decoding": decoding, "num_beams": 3, "max_new_tokens": config.max_new_tokens}
            ),
        )
        assert answers == texts, (mode, decoding)
    with pytest.raises(ValueError, match="config key 'mode' must be 'sequence' or 'token'"):
        DecodingConfig.parse({"mode": "bogus"})
    with pytest.raises(ValueError, match="doc_score_scale"):
        RagModel(model.query_encoder, causal, doc_score_scale=0.0)
