"""The task families: qgen data from SQuAD split by article, the shipped claims, and label scoring
(against a brute-force marginal and against the training loss of each label)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.encoders import TextEncoder
from cluster.passages import squad_dev_path
from examples.make_claims import CLAIM_LABELS, claim_text, make_claims
from services.rag.generator import make_generator
from services.rag.loading import load_generator
from services.rag.marginal import candidate_log_likelihoods, doc_log_probs
from services.rag.model import RagModel
from tests.tiny_models import save_tiny_encoder, save_tiny_generator
from training.data import SHIPPED_CLAIMS, article_split, load_claims, load_qa, squad_qa_by_article
from training.tasks import choose_labels, get_task, label_log_likelihoods, load_qgen

LABELS = ("true", "false", "not enough info")  # label words of 1, 1 and 3 tokens: padded targets


@pytest.fixture()
def squad() -> Path:
    return squad_dev_path()


def test_candidate_log_likelihoods_match_a_brute_force_marginal():
    g = torch.Generator().manual_seed(0)
    b, c, k, t = 2, 3, 4, 3
    log_probs = torch.log_softmax(torch.randn(b, c, k, t, 5, generator=g), -1)[..., 0]  # (B, C, K, T)
    scores = torch.randn(b, k, generator=g)  # (B, K)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])  # (C, T)
    ids = torch.zeros(c, t, dtype=torch.long)
    seq = candidate_log_likelihoods(log_probs, scores, ids, mask)
    tok = candidate_log_likelihoods(log_probs, scores, ids, mask, token=True)
    p_doc = doc_log_probs(scores).exp()  # (B, K)
    for i in range(b):
        for j in range(c):
            n = int(mask[j].sum())
            per_doc = [sum(log_probs[i, j, z, s] for s in range(n)).exp() for z in range(k)]
            want_seq = sum(p_doc[i, z] * per_doc[z] for z in range(k)).log()
            want_tok = sum(
                sum(p_doc[i, z] * log_probs[i, j, z, s].exp() for z in range(k)).log() for s in range(n)
            )
            assert seq[i, j] == pytest.approx(float(want_seq), abs=1e-5)
            assert tok[i, j] == pytest.approx(float(want_tok), abs=1e-5)


@pytest.fixture(scope="module", params=["seq2seq", "causal"])
def rag(request, tmp_path_factory) -> RagModel:
    root = tmp_path_factory.mktemp(f"tiny_{request.param}")
    encoder = TextEncoder.from_pretrained(save_tiny_encoder(root / "encoder", dim=32, layers=1))
    model, tokenizer = load_generator(save_tiny_generator(root / "generator", kind=request.param, dim=32))
    torch.manual_seed(0)
    with torch.no_grad():  # peaked weights: documents and labels get clearly different likelihoods
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0, 0.3)
    return RagModel(encoder, make_generator(model, tokenizer)).eval()


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_label_scores_are_the_training_likelihood_of_each_label(rag, mode):
    """log p(label|x) used for classification is minus the RAG loss the model trains on with that label."""
    inputs = ["apple river is red", "tiger planet is blue"]
    titles = [["apple river", "tiger", "castle"], ["tiger planet", "violin", "apple"]]
    texts = [["red", "blue", "green"], ["blue", "gold", "red"]]
    vectors = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))  # (B, K, d)
    with torch.no_grad():
        scores = rag.doc_scores(rag.encode_queries(inputs), vectors)  # (B, K)
        got = label_log_likelihoods(rag.generator, inputs, titles, texts, scores, LABELS, mode)  # (B, C)
        want = torch.tensor(
            [
                [
                    -float(rag.loss([inputs[i]], [label], [titles[i]], [texts[i]], vectors[i : i + 1], mode))
                    for label in LABELS
                ]
                for i in range(2)
            ]
        )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    other = label_log_likelihoods(
        rag.generator, inputs, titles, texts, scores, LABELS, "token" if mode == "sequence" else "sequence"
    )
    assert (other - got).abs().max() > 0.1  # the two marginals differ here, so the check tells them apart
    chosen = choose_labels(rag.generator, inputs, titles, texts, scores, LABELS, mode)
    assert chosen == [LABELS[i] for i in want.argmax(1).tolist()]
    with pytest.raises(ValueError, match="two label words"):
        label_log_likelihoods(rag.generator, inputs, titles, texts, scores, ["true"], mode)


def test_qgen_turns_squad_around_and_splits_by_article(squad):
    train, test = load_qgen("squad-dev:train"), load_qgen("squad-dev:test")
    assert len(train) + len(test) == len(load_qa("squad-dev")) == 10565
    assert len(test) == 1994  # the 9 test articles of 48 (a hash of the title; see article_split)
    articles = list(squad_qa_by_article(squad))
    test_titles = [t for t, _ in articles if article_split(t) == "test"]
    assert len(test_titles) == 9 and "Normans" in test_titles
    want = [(e.answers[0], e.input) for t, qa in articles if t in test_titles for e in qa]
    assert [(e.input, e.answers) for e in test] == [(a, (q,)) for a, q in want]
    assert get_task("qgen").load is load_qgen


def test_split_needs_squad_format_data(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q?", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="article split"):
        load_qa(f"{path}:test")
    with pytest.raises(ValueError, match="unknown task 'jeopardy'"):
        get_task("jeopardy")


def test_shipped_claims_are_what_make_claims_writes(squad):
    shipped = [json.loads(line) for line in SHIPPED_CLAIMS.read_text(encoding="utf-8").splitlines()]
    assert shipped == make_claims(squad, "test", 200, seed=0)
    assert [c["label"] for c in shipped] == list(CLAIM_LABELS) * 100
    gold = {
        e.input: e.answers for t, qa in squad_qa_by_article(squad) if article_split(t) == "test" for e in qa
    }
    stated = {claim_text(q, a): (q, a) for q, answers in gold.items() for a in answers}
    true_claims = [c["claim"] for c in shipped if c["label"] == "true"]
    assert all(c in stated for c in true_claims)  # a gold answer of a test-split question
    false_claims = [c["claim"] for c in shipped if c["label"] == "false"]
    assert not any(c in stated for c in false_claims) and len(set(false_claims)) == 100


def test_claims_loader(tmp_path):
    examples = load_claims("claims")  # the shipped file, by its data spec
    assert examples == load_claims(str(SHIPPED_CLAIMS))
    assert len(examples) == 200 and {e.answers for e in examples} == {("true",), ("false",)}
    path = tmp_path / "claims.jsonl"
    path.write_text(json.dumps({"claim": "The sky is green.", "label": ""}) + "\n")
    with pytest.raises(ValueError, match="line 1 has no label"):
        load_claims(str(path))
    with pytest.raises(ValueError, match="expected 'claims' or a .jsonl file"):
        load_claims(str(tmp_path / "claims.json"))
