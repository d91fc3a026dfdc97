"""Text encoders: pooling against references, DPR-style loading, fingerprints, bad names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from cluster.encoders import TextEncoder, default_encoder_path, load_encoders
from tests.tiny_models import save_tiny_encoder

TEXTS = ["Who directed 2001: A Space Odyssey?", "Stanley Kubrick was a film director. " * 12, "hi"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"), dim=32, seed=0)


def test_default_matches_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    encoder = TextEncoder.from_pretrained("default")
    assert (encoder.pooling, encoder.normalize, encoder.dim) == ("mean", True, 384)
    reference = SentenceTransformer(default_encoder_path(), device="cpu").encode(TEXTS)
    ours = encoder.encode(TEXTS, batch_size=2)
    assert ours.dtype == np.float32 and ours.shape == (3, 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_tiny_encoder_mean_pooling_by_hand(tiny_path: str) -> None:
    encoder = TextEncoder.from_pretrained(tiny_path)
    assert (encoder.pooling, encoder.normalize, encoder.dim) == ("mean", False, 32)
    batch = encoder.tokenize(TEXTS)
    hidden = encoder.model(**batch).last_hidden_state
    expected = []
    for row in range(len(TEXTS)):
        length = int(batch["attention_mask"][row].sum())
        expected.append(hidden[row, :length].mean(dim=0))
    torch.testing.assert_close(encoder(**batch), torch.stack(expected))
    # encode() batches by length; the vectors must not depend on the batching
    np.testing.assert_allclose(encoder.encode(TEXTS, batch_size=1), encoder.encode(TEXTS), atol=1e-5)


def test_encode_pads_only_texts_of_equal_token_length_and_keeps_order(
    tiny_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = TextEncoder.from_pretrained(tiny_path, max_length=12)
    # each word is one token ([CLS] and [SEP] add two); characters do not order them by tokens
    words = (7, 1, 30, 3, 7, 20, 2, 9)
    texts = [" ".join(["a"] * n if n % 2 else ["nevertheless"] * n) for n in words]
    lengths = [min(n + 2, 12) for n in words]
    assert encoder.token_lengths(texts).tolist() == lengths
    masks = []
    forward = encoder.forward

    def spy(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        masks.append(attention_mask)
        return forward(input_ids, attention_mask)

    monkeypatch.setattr(encoder, "forward", spy)
    vectors = encoder.encode(texts, batch_size=3)
    groups = [sorted(lengths)[i : i + 3] for i in range(0, len(lengths), 3)]
    assert [m.sum(dim=1).tolist() for m in masks] == groups  # each batch: neighbours in length
    assert [m.shape[1] for m in masks] == [max(g) for g in groups]  # padded to its longest only
    one_by_one = np.concatenate([encoder.encode([text], batch_size=1) for text in texts])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)  # rows in the order of `texts`


def test_forward_is_differentiable_and_encode_keeps_train_mode(tiny_path: str) -> None:
    encoder = TextEncoder.from_pretrained(tiny_path).train()
    encoder(**encoder.tokenize(TEXTS)).sum().backward()
    assert encoder.model.embeddings.word_embeddings.weight.grad is not None
    encoder.encode(TEXTS)
    assert encoder.training


def test_dpr_context_encoder_uses_its_cls_pooler(tmp_path: Path) -> None:
    config = transformers.DPRConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        projection_dim=0,
    )
    torch.manual_seed(0)
    reference = transformers.DPRContextEncoder(config).eval()
    reference.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(default_encoder_path()).save_pretrained(tmp_path)
    encoder = TextEncoder.from_pretrained(str(tmp_path))
    assert (encoder.pooling, encoder.normalize) == ("cls", False)
    assert type(encoder.model).__name__ == "DPRContextEncoder"
    batch = encoder.tokenize(TEXTS)
    expected = reference(**batch).pooler_output.detach().numpy()
    np.testing.assert_allclose(encoder.encode(TEXTS), expected, atol=1e-5)


def test_explicit_cls_pooling(tiny_path: str) -> None:
    encoder = TextEncoder.from_pretrained(tiny_path, pooling="cls", normalize=True)
    batch = encoder.tokenize(TEXTS)
    cls = encoder.model(**batch).last_hidden_state[:, 0]
    torch.testing.assert_close(encoder(**batch), torch.nn.functional.normalize(cls, dim=-1))


def test_fingerprint_is_stable_and_tracks_weights(tiny_path: str) -> None:
    first, second = load_encoders(tiny_path)
    assert first.fingerprint() == second.fingerprint() == TextEncoder.from_pretrained(tiny_path).fingerprint()
    with torch.no_grad():
        second.model.embeddings.word_embeddings.weight[5, 0] += 1e-3
    assert first.fingerprint() != second.fingerprint()  # and the two are independent copies
    other = save_tiny_encoder(Path(tiny_path).parent / "seed1", dim=32, seed=1)
    assert TextEncoder.from_pretrained(other).fingerprint() != first.fingerprint()


def test_two_different_models(tiny_path: str, tmp_path: Path) -> None:
    doc_path = save_tiny_encoder(tmp_path / "doc", dim=32, seed=3)
    query, doc = load_encoders(tiny_path, doc_path)
    assert (query.name, doc.name) == (tiny_path, doc_path)
    assert not np.allclose(query.encode(TEXTS), doc.encode(TEXTS))


def test_bad_names_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'no-such-org/no-such-encoder'"):
        TextEncoder.from_pretrained("no-such-org/no-such-encoder")
    with pytest.raises(ValueError, match=str(tmp_path / "missing")):
        TextEncoder.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="'max'"):
        TextEncoder.from_pretrained("default", pooling="max")
